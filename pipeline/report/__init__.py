"""What a person reads: report.html, the figures, and what the commands print.

html.py (report.html, one self-contained page), plots.py (the figures, matplotlib without
a display), terminal.py (the tables and result lines on stdout), model_card.py
(MODEL_CARD.md in the model folder). Imports pipeline.core,
data and inference.
"""
