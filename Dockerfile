# The polykit-cache server as a container image.
#
# Not built in CI: no container engine is available there. This file was checked by reading
# it and by running its steps outside a container (installing the build context with pip, the
# start command, the health check); build it once yourself before relying on it:
#
#   docker build -t polykit-cache .
#   docker run -d --name polykit-cache -p 127.0.0.1:8080:8080 -v polykit-cache:/var/cache/polykit polykit-cache
#
# Options go in as environment variables, e.g. -e POLYKIT_CACHE_MAX_ARTIFACT_SIZE=2GiB
# (every option --some-name is also POLYKIT_CACHE_SOME_NAME). See docs/deploy.md.

FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# The build context holds this checkout (.dockerignore leaves out the virtualenv, caches and tests).
COPY . /tmp/polykit-src
RUN pip install /tmp/polykit-src \
    && rm -rf /tmp/polykit-src \
    && useradd --system --user-group --uid 10001 --home-dir /nonexistent --no-create-home \
       --shell /usr/sbin/nologin polykit \
    && mkdir -p /var/cache/polykit/tmp/spool \
    && chown -R polykit:polykit /var/cache/polykit

# waitress spools request bodies over 512 KiB that do not go straight into the storage folder
# (chunked ones, or all with a bucket store) to TMPDIR: keep them on the storage volume, not
# in the container's own layer. `polykit-cache verify` finds the storage through the variable.
ENV TMPDIR=/var/cache/polykit/tmp/spool \
    POLYKIT_CACHE_STORAGE_DIR=/var/cache/polykit

USER polykit
VOLUME /var/cache/polykit
EXPOSE 8080

# No curl in slim images: python's urllib asks /healthz.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('POLYKIT_CACHE_PORT', '8080'), timeout=4)"]

# The shell makes the spool folder when a fresh host folder is mounted, then execs the server,
# which stops cleanly on the SIGTERM of `docker stop`.
ENTRYPOINT ["/bin/sh", "-c", "mkdir -p \"$TMPDIR\" && exec polykit-cache \"$@\"", "polykit-cache"]
CMD ["--bind", "0.0.0.0", "--storage-dir", "/var/cache/polykit"]
