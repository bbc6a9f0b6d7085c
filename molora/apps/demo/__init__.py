"""``molora demo``: the offline multitask demo on a real pretrained encoder."""
