"""Many runs: sweeps (grid, random search, launchers) and DomainBed-style reports over their run directories."""
