"""``python -m dist_awenc.launch.sweep work SWEEP_DIR --index I --per-job K`` (slurm/sweep_array.sbatch)."""
from dist_awenc.launch.sweep.job import main

raise SystemExit(main())
