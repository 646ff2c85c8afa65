"""Reading and writing SAEs: our own (SAELens) layout, foreign formats, the pretrained registry and the hub."""
