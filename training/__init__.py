"""Trainers that write the files the loader nodes read (run through ``train.py``)."""
