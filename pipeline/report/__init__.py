"""What a person reads: report.html, audit.html, the model card, the figures, the terminal.

html.py (report.html, one self-contained page), audit_page.py (audit.html), model_card.py
(MODEL_CARD.md in the model folder), plots.py and calibration_plots.py (the figures,
matplotlib without a display), terminal.py (the tables and result lines on stdout).
Imports pipeline.core, data and inference.
"""
