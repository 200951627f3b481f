# Sourced by the one-call GPU check scripts (device_verdict_check.sh, dynamic_reads_check.sh):
# the older tree to compare with (their first argument), where the logs go ($OUT, default
# ./out), the time left of the call's ten minutes, and the standard shape's variants with
# layer graphs: G (plain table, no relative bias) and D (the item table dynamic).
set -u
before=${1:?the older tree (a directory holding its megatron_gr package)}
O=${OUT:-out}; mkdir -p "$O"; B=tools/benchmarks; T=tests/unit
export PYTHONUNBUFFERED=1
left() { local l=$(( 575 - SECONDS )); (( l > $1 )) && l=$1; (( l < 1 )) && l=1; echo $l; }
G=model.relative_attention_bias=false,training.cuda_graphs=layers
D=embeddings.item.type=dynamic,embeddings.item.dynamic.capacity=65536
