"""A case- and normalisation-insensitive, case-preserving FUSE passthrough, like macOS's APFS.

Run as ``python insensitive_fs.py BACKING MOUNTPOINT`` (root, /dev/fuse, libfuse2 and fusepy).
A name is looked up as given, and else as any entry of its folder with the same folded
spelling (case-folded, NFD), so ``A``/``a`` and ``é`` in NFC/NFD are one entry, as on the
filesystems the artifact rules must hold on. Used by tests/test_artifact.py only.
"""

import os
import sys
import unicodedata

from fuse import FUSE, FuseOSError, Operations


def fold(name: str) -> str:
    return unicodedata.normalize("NFD", unicodedata.normalize("NFD", name).casefold())


class Insensitive(Operations):
    def __init__(self, root: str) -> None:
        self.root = os.path.realpath(root)

    def _real(self, path: str) -> str:
        cur = self.root
        for part in (p for p in path.split("/") if p):
            cand = os.path.join(cur, part)
            if not os.path.lexists(cand) and os.path.isdir(cur):
                for name in os.listdir(cur):
                    if fold(name) == fold(part):
                        cand = os.path.join(cur, name)
                        break
            cur = cand
        return cur

    def _call(self, fn, *args):
        try:
            return fn(*args)
        except OSError as exc:
            raise FuseOSError(exc.errno) from None

    def getattr(self, path, fh=None):
        st = self._call(os.lstat, self._real(path))
        return {k: getattr(st, k) for k in ("st_atime", "st_ctime", "st_gid", "st_mode", "st_mtime", "st_nlink", "st_size", "st_uid")}

    def readdir(self, path, fh):
        return [".", ".."] + self._call(os.listdir, self._real(path))

    def readlink(self, path):
        return self._call(os.readlink, self._real(path))

    def mkdir(self, path, mode):
        return self._call(os.mkdir, self._real(path), mode)

    def rmdir(self, path):
        return self._call(os.rmdir, self._real(path))

    def unlink(self, path):
        return self._call(os.unlink, self._real(path))

    def symlink(self, name, target):
        return self._call(os.symlink, target, self._real(name))

    def rename(self, old, new):
        return self._call(os.rename, self._real(old), self._real(new))

    def chmod(self, path, mode):
        return self._call(os.chmod, self._real(path), mode)

    def chown(self, path, uid, gid):
        return self._call(os.lchown, self._real(path), uid, gid)

    def utimens(self, path, times=None):
        return self._call(os.utime, self._real(path), times)

    def open(self, path, flags):
        return self._call(os.open, self._real(path), flags)

    def create(self, path, mode, fi=None):
        return self._call(os.open, self._real(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)

    def read(self, path, size, offset, fh):
        return os.pread(fh, size, offset)

    def write(self, path, data, offset, fh):
        return os.pwrite(fh, data, offset)

    def truncate(self, path, length, fh=None):
        self._call(os.truncate, self._real(path), length)

    def flush(self, path, fh):
        return 0

    def release(self, path, fh):
        return os.close(fh)

    def fsync(self, path, datasync, fh):
        return os.fsync(fh)

    def statfs(self, path):
        st = os.statvfs(self._real(path))
        return {k: getattr(st, k) for k in ("f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail", "f_ffree", "f_files", "f_flag", "f_frsize", "f_namemax")}


if __name__ == "__main__":
    FUSE(Insensitive(sys.argv[1]), sys.argv[2], foreground=True, nothreads=True)
