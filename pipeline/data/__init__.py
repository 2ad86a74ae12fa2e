"""The user's image folder to arrays: scanning, decoding, de-duplicating, splitting, augmenting.

images.py (one file decoded and resized, the one way every stage does it),
image_folder.py (which sub-folders are classes), decoding.py (a whole folder decoded in
the worker processes), worker_pool.py (local processes or a Dask cluster), dedup.py
(exact and near-duplicates), splits.py (the grouped, stratified split), augment.py
(albumentations copies), data_folder.py (the data folder's files, written and read),
cache.py, cache_index.py and stat_index.py (prepare's per-file cache, keyed by content).
Imports only pipeline.core.
"""
