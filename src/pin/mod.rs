//! Pinned-DMA model (see DESIGN.md): pin tracking of guest pages under DMA.
