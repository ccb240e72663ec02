#!/bin/sh
# Prints the torch build for this machine: cpu when `nvidia-smi -L` lists no NVIDIA GPU; else by the driver
# version nvidia-smi reports, cuda (PyPI's CUDA 13 build, driver >= 580) or cu126 (the CUDA 12.6 build from
# the PyTorch index, driver >= 525 through CUDA's minor-version compatibility). A driver version that cannot
# be read leaves the default CUDA build (cuda). Used by the Makefile (QES_TORCH=auto) and by the workflow
# (conda.cuda_build: auto), so both read a machine the same way.
listing=$(nvidia-smi -L 2>/dev/null) || { echo cpu; exit 0; }
printf '%s\n' "$listing" | grep -q '^GPU [0-9]' || { echo cpu; exit 0; }
driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -n 1)
major=${driver%%.*}
case "$major" in
  '' | *[!0-9]*) echo cuda ;;
  *) if [ "$major" -ge 580 ]; then echo cuda; else echo cu126; fi ;;
esac
