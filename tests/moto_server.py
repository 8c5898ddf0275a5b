"""moto's S3 and IAM on 127.0.0.1 (a free port, printed on the first line), one request at a time.

moto 5 checks ``If-None-Match`` and then writes without holding anything in between, so two
racing conditional writes can both win on its threaded server; serving one request at a time
makes each write atomic, as a real store's are, so the race tests test our server and not moto.
"""

import sys

from moto.server import DomainDispatcherApplication, create_backend_app
from werkzeug.serving import make_server

if __name__ == "__main__":
    app = DomainDispatcherApplication(create_backend_app)
    server = make_server("127.0.0.1", int(sys.argv[1]) if len(sys.argv) > 1 else 0, app, threaded=False)
    print(server.server_port, flush=True)
    server.serve_forever()
