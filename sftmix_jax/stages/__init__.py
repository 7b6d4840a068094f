"""The pipeline, one stage per file, in order: pretrain (optional base), reference, confidence, sftmix, evaluate.

multiple_choice.py and report.py belong to the evaluate stage. No stage imports another stage."""
