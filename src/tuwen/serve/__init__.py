"""``tuwen serve``: REST server and web page (``app``), continuous batching of decoding (``batcher``),
Prometheus metrics (``metrics``). Needs the ``serve`` extra (FastAPI, uvicorn, python-multipart) for ``app``."""
