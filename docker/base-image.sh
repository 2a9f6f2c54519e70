#!/bin/sh
# A base image for docker/Dockerfile without Docker Hub: Debian bookworm (python 3.11, pip) from Debian's own
# mirror, imported as debian-python:bookworm. Needs root, debootstrap and a running Docker daemon.
#   sh docker/base-image.sh && docker build --build-arg BASE=debian-python:bookworm -t dmoe -f docker/Dockerfile .
set -eu
root=$(mktemp -d)
debootstrap --variant=minbase --include=python3,python3-pip,python3-venv,python-is-python3,ca-certificates \
    bookworm "$root" http://deb.debian.org/debian
tar -C "$root" -c . | docker import - debian-python:bookworm
rm -rf "$root"
