"""`pipeline serve`'s HTTP side: the FastAPI app, reading uploads, the page.

app.py (the routes, the model workers, errors as JSON), uploads.py (request bodies read
into memory within their limits), page.html (the page where a person drops photos).
Imports pipeline.core, data and inference.
"""
