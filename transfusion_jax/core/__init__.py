"""What every trainer shares (DESIGN.md, "Layout"): config loading and checks, the mesh and its
logical rules, distributed start-up, model-agnostic checkpoints, the metrics writer, the
optimizer, FLOP accounting, preemption, sharded state creation from an init function, and the
command-line runner. core imports nothing else of the package."""
