#!/bin/sh
# Make sure attnlab can find Fashion-MNIST: already there → done; root with apt → Debian's dataset-fashion-mnist;
# otherwise the official download (torchvision's mirrors); otherwise say how to get it. $PY is the venv's python.
PY=${PY:-.venv/bin/python}
found() { "$PY" -m attnlab data fashion-mnist >/dev/null 2>&1; }

found && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "Fashion-MNIST: installing Debian's dataset-fashion-mnist"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; } >/dev/null 2>&1
    found && exit 0
fi
echo "Fashion-MNIST: downloading the official files"
"$PY" -m attnlab data fashion-mnist --download >/dev/null 2>&1 && found && exit 0
echo "Fashion-MNIST not found. Get it with 'apt-get install dataset-fashion-mnist' (Debian/Ubuntu, as root), or put the" >&2
echo "four IDX files (train-images-idx3-ubyte.gz, ...) in a folder and set ATTNLAB_DATA=/that/folder." >&2
exit 1
