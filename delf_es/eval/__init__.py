"""Retrieval evaluation: mAP as in the Revisited Oxford/Paris code, ground-truth files."""
