# A xenstore client for a PV domU's busybox shell (sourced by domU init scripts, not a scenario).
# The domU has no xenstore tools and no Python: this speaks the wire protocol itself over the kernel's
# /dev/xen/xenbus (xen-block-protocol.md / xenstore-for-tests.md: a 16-byte header of four little-endian
# u32 -- type, req_id, tx_id, len -- then the payload). Paths without a leading / are relative to the
# domain's home, /local/domain/<domid>, which xenstored resolves for us.

XS_DIRECTORY=1
XS_READ=2
XS_WATCH=4
XS_WRITE=11
XS_RM=13
XS_ERROR=16
XS_TMP=/tmp/xs
mkdir -p "$XS_TMP"

# _xs_le32 N: N as four little-endian bytes, each written as a 3-digit octal escape computed by
# arithmetic: a $(printf %03o) per byte forked 16 subshells a message, and a fork is dear in a PV
# domain under TCG (scenario 17's hostile guest took 8-30 s to write one case's nodes, ci37).
_xs_le32() {
  local b i=0
  while [ $i -lt 32 ]; do
    b=$((($1 >> i) & 255))
    printf "\\$((b >> 6))$(((b >> 3) & 7))$((b & 7))"
    i=$((i + 8))
  done
}

# _xs TYPE: send $XS_TMP/req as the payload; the reply's payload goes to stdout. Status 1 when xenstored
# answered XS_ERROR (the payload then names the errno, e.g. ENOENT). The kernel device gathers partial
# writes into one message and hands back a whole reply per read.
_xs() {
  local len rtype
  len=$(wc -c < "$XS_TMP/req")
  exec 3<>/dev/xen/xenbus || return 2
  { _xs_le32 "$1"; _xs_le32 0; _xs_le32 0; _xs_le32 "$len"; cat "$XS_TMP/req"; } >&3
  dd bs=65536 count=1 <&3 2>/dev/null > "$XS_TMP/reply"
  exec 3<&-
  rtype=$(od -An -tu4 -N4 "$XS_TMP/reply" | tr -d ' \n')
  tail -c +17 "$XS_TMP/reply"
  [ "$rtype" != "$XS_ERROR" ]
}

xs_read() { printf '%s\0' "$1" > "$XS_TMP/req"; _xs "$XS_READ"; }
xs_write() { printf '%s\0%s' "$1" "$2" > "$XS_TMP/req"; _xs "$XS_WRITE" > /dev/null; }
xs_rm() { printf '%s\0' "$1" > "$XS_TMP/req"; _xs "$XS_RM" > /dev/null; }
# xs_ls PATH: one child name per line.
xs_ls() { printf '%s\0' "$1" > "$XS_TMP/req"; _xs "$XS_DIRECTORY" | tr '\0' '\n' | grep -v '^$'; }

# xs_watch PATH: a watch on PATH on a connection of its own (fd 4), so that xs_wait blocks until
# xenstored reports a change (the first event comes at once: read, then wait, loses none). A domain
# that polls instead runs a dozen forks every round, which a PV domain under TCG pays in full on its
# one vCPU: scenario 21's driver domain polled every 0.2 s while its block script's adds and
# removes, sharing that vCPU, ran past libxl's 40 s (stop 38's CI) and dom0's 10 s (ci34).
xs_watch() {
  local len
  printf '%s\0xenci\0' "$1" > "$XS_TMP/watch"
  len=$(wc -c < "$XS_TMP/watch")
  exec 4<>/dev/xen/xenbus || return 2
  { _xs_le32 "$XS_WATCH"; _xs_le32 0; _xs_le32 0; _xs_le32 "$len"; cat "$XS_TMP/watch"; } >&4
}
# xs_wait: until the next message on xs_watch's connection (its reply or an event; either means: look).
xs_wait() { dd bs=65536 count=1 <&4 >/dev/null 2>&1; }
