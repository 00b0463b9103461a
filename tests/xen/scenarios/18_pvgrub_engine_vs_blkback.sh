#!/usr/bin/env bash
# Issue 20's pvgrub goal, read without the order in it: the same pvgrub guest's first boot (xl create ->
# the guest's first I/O) through kernel blkback and through the engine, alternating in one dom0.
# Scenarios 11 (engine) and 15 (blkback) each boot pvgrub too, but one consumer each and always in that
# order, and a dom0's first pvgrub boot is the slowest on every phase: their boots cannot be compared.
# Here a warm-up boot (the engine's, not counted) takes the first-boot cost, then ABBA blocks (blkback,
# engine, engine, blkback; then engine, blkback, blkback, engine; XENCI_PVGRUB_BLOCKS of them, default 2)
# make adjacent pairs, so a drift of the host's load over the scenario falls on both consumers alike.
# Each boot's phases are reported as scenario 11's are (XENCI-METRIC lines, the phase table, create ->
# Connected split), then per pair engine / blkback for the whole boot and per phase, and the median of
# the pairs: reported, not asserted (TCG on a shared host; see bench/README.md "On real Xen").
# Before every boot the consumer is set up afresh, as scenario 12's rounds switch: the engine stopped
# and blkback unloaded, then blkback loaded or a new engine started (its default options).
# A measurement only (nine pvgrub boots, ~600 s on a slow host): a full run's
# (XENBLOCKCTL_XEN_LANE=full); a check run skips it, saying so. Scenarios 11 and 15 boot pvgrub
# through each consumer in every run.
# xenci-timeout: 120
# xenci-full-timeout: 2400
. "$XENCI_SCENARIOS/lib.sh"
full_lane || skip "a measurement (ABBA pvgrub boots): run with XENBLOCKCTL_XEN_LANE=full"
. "$XENCI_SCENARIOS/pvguest.sh"
. "$XENCI_SCENARIOS/pvgrub.sh"

pvgrub_engine_scenario
: >"$PVGRUB_PHASES"

# Every boot starts from no consumer at all, the same for both: no engine, blkback unloaded (it lets
# go of the destroyed guest's backend device a moment after the loop device is free); then a fresh
# engine process or a fresh blkback module, also between two boots of the same consumer.
no_consumer() {
  [ -z "$engine_pid" ] || stop_engine
  wait_for "xen-blkback to unload" 30 bash -c 'rmmod xen-blkback 2>/dev/null; [ ! -d /sys/module/xen_blkback ]'
}
use_blkback() {
  no_consumer
  modprobe xen-blkback || true
  [ -d /sys/module/xen_blkback ] || fail "xen-blkback is not loaded"
}
use_engine() {
  no_consumer
  without_blkback
  start_engine
}
# fair_boot CONSUMER LABEL: one first boot of the guest through CONSUMER, its phases kept as LABEL's.
fair_boot() {
  say "$2 (dom0 load: $(cut -d' ' -f1-3 /proc/loadavg))"
  "use_$1"
  pvgrub_first_boot "$1" "$2"
}

fair_boot engine fair_warmup_engine
BLOCKS=${XENCI_PVGRUB_BLOCKS:-2}
pairs=()  # "ENGINE-LABEL BLKBACK-LABEL" per pair, in boot order
for ((block = 1; block <= BLOCKS; block++)); do
  first=$((2 * block - 1)) second=$((2 * block))
  if ((block % 2)); then order="blkback engine engine blkback"; else order="engine blkback blkback engine"; fi
  n=0
  for consumer in $order; do
    n=$((n + 1))
    pair=$(( n <= 2 ? first : second ))
    fair_boot "$consumer" "fair${pair}_$consumer"
  done
  pairs+=("fair${first}_engine fair${first}_blkback" "fair${second}_engine fair${second}_blkback")
done

# The comparison, from the phases every boot saved ("LABEL PHASE SECONDS"): each counted boot's row,
# then engine / blkback per pair and the median of the pairs, for the whole boot and per phase.
awk -v pairs="$(IFS=';'; echo "${pairs[*]}")" '
  { v[$1, $2] = $3; seen[$1] = 1 }
  function median(list, n,    i, j, x, a) {
    n = split(list, a, " ")
    for (i = 2; i <= n; i++) { x = a[i]; for (j = i - 1; j >= 1 && a[j] > x; j--) a[j + 1] = a[j]; a[j + 1] = x }
    return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
  }
  END {
    np = split(pairs, pl, ";")
    nph = split("total grub_connected grub_done linux_init linux_connected guest_io connect_initwait connect_pdev connect_hotplug connect_grub_init connect_grub_connected", ph, " ")
    name["total"] = "create -> first I/O"; name["grub_connected"] = "create -> Connected"
    name["grub_done"] = "GRUB reads"; name["linux_init"] = "-> Linux init"
    name["linux_connected"] = "-> Linux Connected"; name["guest_io"] = "-> first I/O"
    name["connect_initwait"] = "(create -> InitWait)"; name["connect_pdev"] = "(-> physical-device)"
    name["connect_hotplug"] = "(-> hotplug-status)"; name["connect_grub_init"] = "(-> GRUB Initialised)"
    name["connect_grub_connected"] = "(-> Connected)"
    printf "--- pvgrub first boots, seconds: pair N = fairN_blkback (bN) and fairN_engine (eN), engine / blkback (rN)\n%-22s", "phase"
    for (p = 1; p <= np; p++) printf " %6s %6s %5s", "b" p, "e" p, "r" p
    printf " %6s\n", "median"
    for (k = 1; k <= nph; k++) {
      f = ph[k]; printf "%-22s", name[f]; list = ""
      for (p = 1; p <= np; p++) {
        split(pl[p], l, " ")
        e = ((l[1], f) in v) ? v[l[1], f] : ""; b = ((l[2], f) in v) ? v[l[2], f] : ""
        r = (e != "" && b != "" && b > 0) ? sprintf("%.2f", e / b) : "n/a"
        if (r != "n/a") list = list " " r
        printf " %6s %6s %5s", b == "" ? "-" : sprintf("%.2f", b), e == "" ? "-" : sprintf("%.2f", e), r
        if (r != "n/a") ratio[p, f] = r
      }
      med[f] = list == "" ? "n/a" : sprintf("%.2f", median(list))
      printf " %6s\n", med[f]
    }
    for (p = 1; p <= np; p++)
      if ((p, "total") in ratio) printf "XENCI-METRIC: pvgrub_pair%d_engine_over_blkback=%s\n", p, ratio[p, "total"]
    for (k = 1; k <= nph; k++)
      if (med[ph[k]] != "n/a") printf "XENCI-METRIC: pvgrub_median_%s_engine_over_blkback=%s\n", ph[k], med[ph[k]]
  }' "$PVGRUB_PHASES"
grep -q ' total ' "$PVGRUB_PHASES" || fail "no boot saved its phases to $PVGRUB_PHASES"
say "the same pvgrub guest's first boot through blkback and the engine, alternating in ABBA blocks: ratios above (reported, not asserted)"
