#!/bin/busybox sh
# /init of the colofs test guest (busybox ash, PID 1 of an initramfs).
#
# Kernel command line words it reads:
#   colofs.mode=format|verify   format: mkfs.ext4 the virtio disk, then churn
#                               verify: check the newest complete generation, fsck, result line
#   colofs.seed=N               content seed (file contents are a function of seed, gen, file)
#   colofs.gens=N               churn until generation N, then fsck and report (0: forever)
#   colofs.then=churn           verify, then keep churning from the verified generation
#
# Generation g writes five files into slot g%5 of /mnt/data and replaces /mnt/MANIFEST (which
# lists generations g-3..g) atomically; then it prints "COLOFS gen=g" through /dev/kmsg, which the
# kernel writes to the serial console before the write returns: a line the host has read means the
# generation is on the disk. The slot being rewritten held g-5, which no manifest since g-1 lists,
# so the disk verifies after a crash at any instant. Every outcome ends in one line
# "COLOFS RESULT ok|fail ..." and a power-off.

/bin/busybox mkdir -p /proc /sys /dev /tmp /mnt /bin /sbin
/bin/busybox --install -s /bin
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev

say() { echo "<2>COLOFS $*" > /dev/kmsg; }
finish() { sync; poweroff -f; }
fail() { say "RESULT fail $*"; finish; }

MODE=verify SEED=1 GENS=0 THEN=
for w in $(cat /proc/cmdline); do
    case "$w" in
        colofs.mode=*) MODE=${w#*=} ;;
        colofs.seed=*) SEED=${w#*=} ;;
        colofs.gens=*) GENS=${w#*=} ;;
        colofs.then=*) THEN=${w#*=} ;;
    esac
done
SIZES="700 3000 40000 250000 1000000"

for m in $(cat /modules/order); do
    insmod "/modules/$m.ko" || fail "reason=insmod-$m"
done
n=0
while [ ! -b /dev/vda ]; do
    n=$((n + 1)); [ $n -gt 300 ] && fail "reason=no-/dev/vda"
    sleep 0.1
done
say "up"

content() {  # content GEN FILE SIZE: the bytes of one file
    yes "colofs seed=$SEED gen=$1 file=$2" | head -c "$3"
}

write_gen() {  # write_gen G: one generation, synced, then announced
    g=$1 slot=$(($1 % 5))
    rm -rf "/mnt/data/s$slot" && mkdir -p "/mnt/data/s$slot" || fail "reason=mkdir gen=$g"
    i=0
    for s in $SIZES; do
        content "$g" "$i" "$s" > "/mnt/data/s$slot/g$g-f$i" || fail "reason=write gen=$g"
        i=$((i + 1))
    done
    (cd /mnt && sha256sum data/s$slot/g$g-f*) > "/tmp/m.$g" || fail "reason=sum gen=$g"
    rm -f "/tmp/m.$(($g - 4))"
    {
        echo "colofs-manifest seed=$SEED gen=$g"
        lo=$(($g - 3)); [ $lo -lt 1 ] && lo=1
        while [ $lo -le $g ]; do cat "/tmp/m.$lo"; lo=$((lo + 1)); done
    } > /tmp/manifest.last || fail "reason=manifest gen=$g"
    cp /tmp/manifest.last /mnt/MANIFEST.tmp || fail "reason=manifest gen=$g"
    sync
    mv /mnt/MANIFEST.tmp /mnt/MANIFEST
    sync
    say "gen=$g"
}

churn() {  # churn FROM: generations FROM, FROM+1, ... up to GENS (0: forever)
    g=$1
    while [ "$GENS" = 0 ] || [ $g -le "$GENS" ]; do
        write_gen $g
        g=$((g + 1))
    done
    umount /mnt || fail "reason=umount"
    e2fsck.static -fn /dev/vda > /tmp/fsck 2>&1 || fail "reason=fsck-after-churn"
    say "RESULT ok mode=churn gen=$GENS manifest=$(sha256sum < /tmp/manifest.last | cut -d' ' -f1)"
    finish
}

verify() {  # sets K: the newest complete generation, every file of it checked against the seed
    mount -t ext4 /dev/vda /mnt || fail "reason=mount"
    [ -f /mnt/MANIFEST ] || fail "reason=no-manifest"
    set -- $(head -n 1 /mnt/MANIFEST)
    [ "$1 $2" = "colofs-manifest seed=$SEED" ] || fail "reason=manifest-header"
    K=${3#gen=}
    lo=$(($K - 3)); [ $lo -lt 1 ] && lo=1
    echo "colofs-manifest seed=$SEED gen=$K" > /tmp/expected
    g=$lo
    while [ $g -le $K ]; do
        slot=$(($g % 5)) i=0 names=
        for s in $SIZES; do
            h=$(content $g $i $s | sha256sum | cut -d' ' -f1)
            echo "$h  data/s$slot/g$g-f$i" >> /tmp/expected
            names="$names g$g-f$i"
            i=$((i + 1))
        done
        got=$(ls "/mnt/data/s$slot" 2>/dev/null | tr '\n' ' ')
        [ " $got" = "$names " ] || fail "reason=files-of-gen-$g gen=$K"
        g=$((g + 1))
    done
    cmp -s /tmp/expected /mnt/MANIFEST || fail "reason=manifest-differs gen=$K"
    (cd /mnt && tail -n +2 MANIFEST | sha256sum -c -s 2>/dev/null) || fail "reason=content-differs gen=$K"
    umount /mnt || fail "reason=umount"
    e2fsck.static -fn /dev/vda > /tmp/fsck 2>&1 || fail "reason=fsck gen=$K"
}

case "$MODE" in
    format)
        MKE2FS_CONFIG=/etc/mke2fs.conf /sbin/mke2fs -q -F -t ext4 \
            -E lazy_itable_init=0,lazy_journal_init=0 /dev/vda || fail "reason=mkfs"
        mount -t ext4 /dev/vda /mnt || fail "reason=mount"
        mkdir -p /mnt/data
        say "formatted"
        churn 1
        ;;
    verify)
        verify
        say "RESULT ok mode=verify gen=$K manifest=$(sha256sum < /tmp/expected | cut -d' ' -f1)"
        if [ "$THEN" = churn ]; then
            mount -t ext4 /dev/vda /mnt || fail "reason=remount"
            lo=$(($K - 3)); [ $lo -lt 1 ] && lo=1
            while [ $lo -le $K ]; do
                (cd /mnt && sha256sum data/s$(($lo % 5))/g$lo-f*) > "/tmp/m.$lo"
                lo=$((lo + 1))
            done
            churn $(($K + 1))
        fi
        finish
        ;;
    *) fail "reason=unknown-mode-$MODE" ;;
esac
