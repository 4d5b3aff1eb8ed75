#!/usr/bin/env bash
# The Debian packages raycf's tests need, installed when missing (as root).
#
#   openssh-server rsync iproute2 util-linux   the cluster round trip and placement
#                                              (tests/test_cluster_roundtrip.py, tests/test_cluster_placement.py)
#   chromium                                   the report's browser test (tests/test_report.py)
#   dataset-fashion-mnist                      the Fashion-MNIST reader on the real files (tests/test_data.py)
#
# `make test` and .ci/run call this first.  As root it installs what is missing;
# as another user it installs nothing and says which packages are missing: the
# tests that need them are skipped, each naming its package (under CI=true a
# missing package fails them instead).
set -euo pipefail
PACKAGES=(openssh-server rsync iproute2 util-linux chromium dataset-fashion-mnist)

missing=()
for package in "${PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$package")
    fi
done
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
    echo "system-packages: missing ${missing[*]} (not root: installing nothing; the tests that need them will be skipped;" \
        "install with: sudo apt-get install -y ${missing[*]})" >&2
    exit 0
fi
echo "system-packages: installing ${missing[*]}" >&2
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
