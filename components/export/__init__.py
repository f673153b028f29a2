"""Export of the descriptor network to portable formats, and describers that run them without torch."""
