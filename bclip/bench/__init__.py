"""Benchmarks that print one JSON line per setting: the jitted train step (`step`), the input
pipeline (`data`, `views`) and vectorised sweeps against separate runs (`sweep`).

  python -m bclip.bench step --model tiny-vit --batch_size 128 --objective mmcl
  python -m bclip.bench data --data_dir /tmp/bench_world --image_size 224 --num_images 2000 --workers 0,1,2
  python -m bclip.bench data --num_images 1000 --workers 0 --threads 1,2 --settings badnets_1pct
  python -m bclip.bench views --image_size 224 --batch_size 64
  python -m bclip.bench sweep --model micro-vit --num_runs 4 --steps 20 --batch_size 32
  python -m bclip.bench sweep --end_to_end --num_runs 4
"""
