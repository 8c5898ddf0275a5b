import pytest

from support import new_app


@pytest.fixture
def app(tmp_path):
    """The WSGI application over a fresh storage folder."""
    return new_app(tmp_path / "store")
