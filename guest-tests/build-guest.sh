#!/usr/bin/env bash
# guest-tests/build-guest.sh -- build the pinblk test guest (kernel + initramfs).
#
# Usage: guest-tests/build-guest.sh [OUTDIR]        (default: $PWD/target/guest)
#
# Produces:
#   OUTDIR/bzImage             Debian amd64 kernel (from linux-image-<ver>-amd64)
#   OUTDIR/initramfs.cpio.gz   busybox-static + Debian fio (+ its shared libs)
#                              + mke2fs/e2fsck + virtio/ext4 modules + /init
#                              (= guest-tests/guest-init.sh) + the guest
#                              programs guest-tests/progs/*.c, compiled with
#                              gcc -static -O2 -pthread into /usr/bin/NAME
#   OUTDIR/kernel-version      the guest kernel release string
#   OUTDIR/cache/              downloaded .deb (reused on the next build)
#
# Idempotent: does nothing when bzImage and initramfs.cpio.gz are newer than
# this script, guest-init.sh and guest-tests/progs/* (set FORCE=1 to rebuild
# anyway).
#
# Missing host packages (qemu-system-x86 fio busybox-static cpio xz-utils zstd
# e2fsprogs gcc libc6-dev) are installed with apt-get (via sudo when not root); apt-get update
# runs only if one of them is unknown to apt.  Environment overrides:
#   GUEST_KERNEL_VERSION=6.1.0-56-amd64   pick the kernel package explicitly
#   GUEST_KERNEL_DEB=/path/linux-image-...deb   use this .deb, no download
#   FORCE=1                               rebuild even if up to date
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
INIT_SRC=$SCRIPT_DIR/guest-init.sh
OUTDIR=${1:-$PWD/target/guest}
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)

log() { printf 'build-guest: %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[[ -f $INIT_SRC ]] || die "missing $INIT_SRC"

if [[ ${FORCE:-0} != 1 && -f $OUTDIR/bzImage && -f $OUTDIR/initramfs.cpio.gz ]]; then
	uptodate=1
	for out in "$OUTDIR/bzImage" "$OUTDIR/initramfs.cpio.gz"; do
		for src in "${BASH_SOURCE[0]}" "$INIT_SRC" "$SCRIPT_DIR"/progs/*; do
			[[ -e $src ]] || continue
			[[ $out -nt $src ]] || uptodate=0
		done
	done
	if [[ $uptodate == 1 ]]; then
		log "up to date: $OUTDIR (FORCE=1 to rebuild)"
		exit 0
	fi
fi

SUDO=()
if [[ $(id -u) != 0 ]]; then
	SUDO=(sudo)
fi

# ---- host packages --------------------------------------------------------
pkg_installed() {
	[[ $(dpkg-query -W -f='${Status}' "$1" 2>/dev/null) == "install ok installed" ]]
}
pkg_known() {
	local cand
	cand=$(apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/{print $2; exit}')
	[[ -n $cand && $cand != "(none)" ]]
}
ensure_packages() {
	local missing=() p
	for p in "$@"; do
		pkg_installed "$p" || missing+=("$p")
	done
	((${#missing[@]})) || return 0
	log "installing: ${missing[*]}"
	for p in "${missing[@]}"; do
		if ! pkg_known "$p"; then
			log "package $p unknown to apt; running apt-get update"
			"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
				apt-get -o DPkg::Lock::Timeout=600 update
			break
		fi
	done
	local install=("${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive
		apt-get -o DPkg::Lock::Timeout=600 install -y --no-install-recommends "${missing[@]}")
	if ! "${install[@]}"; then
		# Stale package lists give 404s: refresh once and retry.
		log "apt-get install failed; running apt-get update and retrying"
		"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
			apt-get -o DPkg::Lock::Timeout=600 update
		"${install[@]}"
	fi
}
ensure_packages qemu-system-x86 fio busybox-static cpio xz-utils zstd e2fsprogs gcc libc6-dev

# ---- guest kernel ---------------------------------------------------------
CACHE=$OUTDIR/cache
mkdir -p "$CACHE"

find_kernel_version() {
	local v
	v=$(apt-cache depends linux-image-amd64 2>/dev/null |
		awk '/Depends: linux-image-[0-9]/{sub(/^linux-image-/, "", $2); print $2; exit}')
	if [[ -z $v ]]; then
		v=$(apt-cache search --names-only '^linux-image-[0-9.]+-[0-9]+-amd64$' 2>/dev/null |
			awk '{sub(/^linux-image-/, "", $1); print $1}' | sort -V | tail -n1)
	fi
	printf '%s\n' "$v"
}

KDEB=${GUEST_KERNEL_DEB:-}
if [[ -z $KDEB ]]; then
	KVER_PKG=${GUEST_KERNEL_VERSION:-$(find_kernel_version)}
	if [[ -z $KVER_PKG ]]; then
		log "cannot resolve linux-image-amd64; running apt-get update"
		"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 update
		KVER_PKG=$(find_kernel_version)
	fi
	if [[ -n $KVER_PKG ]]; then
		KDEB=$(find "$CACHE" -maxdepth 1 -name "linux-image-${KVER_PKG}_*.deb" | sort -V | tail -n1)
		if [[ -z $KDEB ]]; then
			log "downloading linux-image-$KVER_PKG"
			# apt-get download writes into the current directory.  As root it
			# warns that the _apt sandbox user cannot write there; harmless.
			if (cd "$CACHE" && apt-get download "linux-image-$KVER_PKG" >&2) ||
				{
					log "apt-get download failed; running apt-get update and retrying"
					"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
						apt-get -o DPkg::Lock::Timeout=600 update >&2
					(cd "$CACHE" && apt-get download "linux-image-$KVER_PKG" >&2)
				}; then
				KDEB=$(find "$CACHE" -maxdepth 1 -name "linux-image-${KVER_PKG}_*.deb" | sort -V | tail -n1)
			else
				log "WARNING: apt-get download linux-image-$KVER_PKG failed"
			fi
		fi
	fi
	if [[ -z $KDEB ]]; then
		# Fall back to any kernel .deb left in the cache by an earlier build.
		KDEB=$(find "$CACHE" -maxdepth 1 -name 'linux-image-*-amd64_*.deb' | sort -V | tail -n1)
	fi
fi

WORK=$(mktemp -d "$OUTDIR/.build.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

if [[ -n $KDEB ]]; then
	log "kernel package: $KDEB"
	dpkg -x "$KDEB" "$WORK/kpkg"
	VMLINUZ=$(find "$WORK/kpkg/boot" -name 'vmlinuz-*' | head -n1)
	KREL=${VMLINUZ##*/vmlinuz-}
	MODDIR=
	for d in "$WORK/kpkg/lib/modules/$KREL" "$WORK/kpkg/usr/lib/modules/$KREL"; do
		[[ -d $d ]] && MODDIR=$d
	done
elif [[ -r /boot/vmlinuz-$(uname -r) && -d /lib/modules/$(uname -r) ]]; then
	# Last resort: the host's own kernel (works when the host runs Debian).
	KREL=$(uname -r)
	log "WARNING: no kernel package available; using host kernel $KREL"
	VMLINUZ=/boot/vmlinuz-$KREL
	MODDIR=/lib/modules/$KREL
else
	die "no guest kernel: apt-get download linux-image-<ver>-amd64 failed and no readable host kernel"
fi
[[ -f $VMLINUZ ]] || die "no vmlinuz in kernel package"
[[ -n $MODDIR ]] || die "no module directory for $KREL"
log "guest kernel: $KREL"

# ---- initramfs root ---------------------------------------------------------
ROOT=$WORK/root
mkdir -p "$ROOT"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,mnt,run,etc,job,lib/modules/pinblk}

# busybox (must be static: it is the only thing that runs before the libs work)
BUSYBOX=$(command -v busybox || true)
[[ -n $BUSYBOX ]] || BUSYBOX=/bin/busybox
[[ -x $BUSYBOX ]] || die "busybox not found"
if ldd "$BUSYBOX" >/dev/null 2>&1; then
	[[ -x /bin/busybox ]] && ! ldd /bin/busybox >/dev/null 2>&1 && BUSYBOX=/bin/busybox
	ldd "$BUSYBOX" >/dev/null 2>&1 && die "$BUSYBOX is dynamically linked; need busybox-static"
fi
cp "$BUSYBOX" "$ROOT/bin/busybox"
while read -r applet; do
	applet=${applet#/}
	[[ -n $applet && $applet != bin/busybox ]] || continue
	mkdir -p "$ROOT/$(dirname "$applet")"
	[[ -e $ROOT/$applet ]] || ln -s /bin/busybox "$ROOT/$applet"
done < <("$ROOT/bin/busybox" --list-full)
[[ -e $ROOT/bin/sh ]] || ln -s busybox "$ROOT/bin/sh"

# dynamic executables with every library ldd reports, at the same paths
copy_file() { # copy_file SRC DEST-PATH-IN-ROOT
	mkdir -p "$ROOT/$(dirname "$2")"
	cp -L "$1" "$ROOT/$2"
}
copy_with_libs() { # copy_with_libs BINARY [NAME-IN-ROOT]
	local bin=$1 dest=${2:-$1} lib
	copy_file "$bin" "$dest"
	while read -r lib; do
		[[ -n $lib && -e $ROOT/$lib ]] && continue
		[[ -n $lib ]] || continue
		[[ -e $lib ]] || die "ldd $bin: missing $lib"
		copy_file "$lib" "$lib"
	done < <(ldd "$bin" | awk '
		/=> not found/ { print "NOTFOUND:" $1 > "/dev/stderr"; next }
		/=> \// { print $3; next }
		/^[[:space:]]*\// { print $1 }')
}
copy_with_libs "$(command -v fio || echo /usr/bin/fio)" /usr/bin/fio
for b in mke2fs e2fsck; do
	p=$(PATH=$PATH:/sbin:/usr/sbin command -v "$b" || true)
	if [[ -n $p ]]; then
		copy_with_libs "$p" "/usr/sbin/$b"
	fi
done
if [[ -e $ROOT/usr/sbin/mke2fs ]]; then
	for n in mkfs.ext4 mkfs.ext2 mkfs.ext3; do
		rm -f "$ROOT/usr/sbin/$n" "$ROOT/sbin/$n"
		ln -s mke2fs "$ROOT/usr/sbin/$n"
	done
fi
if [[ -e $ROOT/usr/sbin/e2fsck ]]; then
	rm -f "$ROOT/sbin/fsck.ext4" "$ROOT/usr/sbin/fsck.ext4"
	ln -s e2fsck "$ROOT/usr/sbin/fsck.ext4"
fi
# Library search path for the dynamic loader (no ld.so.cache in the guest).
find "$ROOT" -name '*.so*' -type f -printf '%h\n' | sed "s|^$ROOT||" | sort -u >"$ROOT/etc/ld.so.conf"
printf 'root:x:0:0:root:/root:/bin/sh\n' >"$ROOT/etc/passwd"
printf 'root:x:0:\n' >"$ROOT/etc/group"
if command -v ldconfig >/dev/null 2>&1; then
	ldconfig -r "$ROOT" 2>/dev/null || log "WARNING: ldconfig -r failed (ld.so default paths still apply)"
fi

# ---- guest programs (guest-tests/progs/*.c -> /usr/bin/NAME, static) -------
for src in "$SCRIPT_DIR"/progs/*.c; do
	[[ -e $src ]] || continue
	name=$(basename "$src" .c)
	gcc -static -O2 -pthread -Wall -o "$ROOT/usr/bin/$name" "$src" ||
		die "gcc failed for $src"
	log "guest program: /usr/bin/$name"
done

# ---- kernel modules -------------------------------------------------------
# Wanted modules in load order; their dependencies (from .modinfo depends=)
# are inserted before them.  Modules that are built in or absent are skipped;
# the guest init tolerates missing files.
WANTED_MODULES=(
	virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk
	crc16 mbcache jbd2 crc32c_generic libcrc32c ext4
)
declare -A MODPATH=()
while IFS= read -r -d '' f; do
	n=${f##*/}
	n=${n%%.ko*}
	MODPATH[${n//-/_}]=$f
done < <(find "$MODDIR" -name '*.ko*' -print0)

decompress_module() { # decompress_module SRC DEST
	case $1 in
	*.ko.xz) xz -dc "$1" >"$2" ;;
	*.ko.zst) zstd -qdc "$1" >"$2" ;;
	*.ko.gz) gzip -dc "$1" >"$2" ;;
	*) cp "$1" "$2" ;;
	esac
}
declare -A MODDONE=()
LOAD_ORDER=()
add_module() { # add_module NAME (depth-first, dependencies first)
	local name=${1//-/_} dep deps src dst
	[[ -n ${MODDONE[$name]:-} ]] && return 0
	MODDONE[$name]=1
	src=${MODPATH[$name]:-}
	if [[ -z $src ]]; then
		if grep -qE "/${name//_/[-_]}\.ko" "$MODDIR/modules.builtin" 2>/dev/null; then
			log "module $name: built in"
		else
			log "module $name: not found (skipped)"
		fi
		return 0
	fi
	dst=$ROOT/lib/modules/pinblk/$name.ko
	decompress_module "$src" "$dst"
	deps=$(tr '\0' '\n' <"$dst" | sed -n 's/^depends=//p' | head -n1)
	for dep in ${deps//,/ }; do
		add_module "$dep"
	done
	LOAD_ORDER+=("$name")
}
for m in "${WANTED_MODULES[@]}"; do
	add_module "$m"
done
printf '%s\n' "${LOAD_ORDER[@]}" >"$ROOT/lib/modules/pinblk/load-order"
log "module load order: ${LOAD_ORDER[*]}"

# ---- init + archive -------------------------------------------------------
cp "$INIT_SRC" "$ROOT/init"
chmod 0755 "$ROOT/init"
printf '%s\n' "$KREL" >"$ROOT/etc/pinblk-guest-kernel"

(cd "$ROOT" && find . -print0 | LC_ALL=C sort -z |
	cpio --null --create --format=newc --owner=0:0 --quiet) | gzip -6 >"$WORK/initramfs.cpio.gz"
cp "$VMLINUZ" "$WORK/bzImage"
mv -f "$WORK/bzImage" "$OUTDIR/bzImage"
mv -f "$WORK/initramfs.cpio.gz" "$OUTDIR/initramfs.cpio.gz"
printf '%s\n' "$KREL" >"$OUTDIR/kernel-version"
log "done: $OUTDIR/bzImage $OUTDIR/initramfs.cpio.gz ($(du -h "$OUTDIR/initramfs.cpio.gz" | cut -f1)) kernel $KREL"
