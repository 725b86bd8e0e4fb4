#!/usr/bin/env bash
# Installs Debian's Fashion-MNIST files (/usr/share/datasets/fashion-mnist) when we can: root and apt.
# Without them the fashion_mnist builder falls back to tfds' own download (needs network).
set -u
[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && exit 0
command -v apt-get >/dev/null || exit 1
[ "$(id -u)" = 0 ] || exit 1
apt-get update -qq >/dev/null 2>&1
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1
