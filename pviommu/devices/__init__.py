"""Device models (they see virtqueues and DMA spaces, never a transport)."""
