"""Graph passes. Each module exposes `run(gm, ctx) -> (GraphModule, PassReport)`;
graphopt/pipeline.py decides their order."""
