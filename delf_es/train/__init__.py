"""Two-step DELF training (Noh et al. 2017): stage 1 fine-tunes the backbone's feature layers
with cross-entropy on image labels, stage 2 trains the attention head on the frozen backbone's
cached local feature maps.  Entry point: ``delf-es train backbone|attention``."""
