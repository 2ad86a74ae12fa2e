"""The user's image folder to arrays: scanning, decoding, de-duplicating, splitting, augmenting.

images.py (one file decoded and resized, the one way every stage does it),
image_folder.py (which sub-folders are classes), fixes.py (`prepare --fixes`: audit.csv's
decisions applied to the scan), decoding.py (a whole folder decoded in the worker
processes), cache.py, cache_index.py and stat_index.py (prepare's per-file cache, keyed by
content), worker_pool.py (local processes or a Dask cluster), health.py (cleanvision's
checks on the decoded pictures), dedup.py (exact and near-duplicates), splits.py (the
grouped, stratified split, and audit's folds), augment.py (albumentations copies),
label_issues.py (cleanlab on out-of-fold probabilities), data_folder.py (the data
folder's files, written and read). Imports only pipeline.core.
"""
