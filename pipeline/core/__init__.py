"""The ground every stage stands on: errors, artifact paths, settings, atomic artifacts, progress.

errors.py (PipelineError, the one error a user can cause), paths.py (every artifact's
name), settings.py (every option's default, light enough for `--help`), artifacts.py
(folders written atomically, read back without pickle), progress.py (bars and notes on
stderr), native_stderr.py (TensorFlow, Keras and LiteRT imported quietly). Imports nothing
else of pipeline's.
"""
