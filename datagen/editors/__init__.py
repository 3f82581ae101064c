"""Teacher editors behind one interface (`base.Editor`), one file each, chosen with `editor=`:
pix2pix_zero, p2p (Prompt-to-Prompt), word_swap (DDIM + word swap), sdedit."""
