"""Training: the plan and the one loop (engine), the Accelerate runtime, evaluation, and optimisation."""
