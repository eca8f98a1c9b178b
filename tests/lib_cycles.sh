#!/usr/bin/env bash
# lib_cycles.sh OBJDIR — prints the pairs of library objects that call each other (each defines a
# symbol the other uses) and fails if there is one: every layer must only use the ones below it.
# Known exception: the AVX2 attention kernels (ops_avx2.c, ops_qattn_avx2.c, ops_qattn8_avx2.c)
# fall back to the scalar references in ops.c for the cases they do not vectorise, while ops.c
# dispatches to them.
set -u
objdir=$1
declare -A def uses
objs=$(find "$objdir" -name '*.o' | sort)
[ -n "$objs" ] || { echo "lib_cycles: no objects under $objdir"; exit 1; }
for o in $objs; do
    for s in $(nm --defined-only "$o" | awk '$2 ~ /[TDBR]/ {print $3}'); do def[$s]=$o; done
done
for o in $objs; do
    for s in $(nm -u "$o" | awk '{print $2}'); do
        d=${def[$s]:-}
        [ -n "$d" ] && [ "$d" != "$o" ] && uses["$o>$d"]=$s
    done
done
n=0
for k in "${!uses[@]}"; do
    a=${k%%>*} b=${k#*>}
    [[ "$a" < "$b" ]] && [ -n "${uses[$b>$a]:-}" ] || continue
    pair="${a#"$objdir"/} <-> ${b#"$objdir"/}"
    case "$pair" in "ops.o <-> ops_avx2.o"|"ops.o <-> ops_qattn_avx2.o"|"ops.o <-> ops_qattn8_avx2.o") continue;; esac
    echo "cycle: $pair (${uses[$k]} / ${uses[$b>$a]})"
    n=$((n+1))
done
[ $n -eq 0 ] && echo "lib_cycles: no two library files call each other" || exit 1
