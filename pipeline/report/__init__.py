"""What a person reads: report.html, the figures, and what the commands print.

html.py (report.html, one self-contained page), plots.py (the figures, matplotlib without
a display), terminal.py (the tables and result lines on stdout). Imports pipeline.core,
data and inference.
"""
