"""`pipeline serve`'s and `pipeline review`'s HTTP side: the FastAPI apps, their limits, the pages.

app.py (the routes, the model workers, errors as JSON, /docs served offline), limits.py
(requests in flight and their bytes, 503 with Retry-After, slow clients' timeouts),
uploads.py (request bodies read into memory within their limits), page.html (the page
where a person drops photos); review_app.py (review's routes: the findings, the decisions,
the pictures), review_findings.py (one finding per file, the decisions and reviewed.csv),
review.html (the page where a person decides). Imports pipeline.core, data and inference.
"""
