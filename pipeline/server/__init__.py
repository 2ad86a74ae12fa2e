"""`pipeline serve`'s HTTP side: the FastAPI app, its limits, reading uploads, the page.

app.py (the routes, the model workers, errors as JSON, /docs served offline), limits.py
(requests in flight and their bytes, 503 with Retry-After, slow clients' timeouts),
uploads.py (request bodies read into memory within their limits), page.html (the page
where a person drops photos). Imports pipeline.core, data and inference.
"""
