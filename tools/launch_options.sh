# How every recipe's training stages are launched: the options run.sh shares, with their defaults.
# Sourced by run.sh before ../../tools/parse_options.sh (so each can be given on the command
# line, and --help lists them); tools/recipe_common.sh's train() applies them to every training call.
ngpu=1                 # processes per node (GPUs; on a CPU-only machine: gloo processes). >1 runs under torchrun
num_nodes=1            # nodes; >1 without --hostfile: run this script on every node with its --node_rank
node_rank=0            # this node's rank (0 .. num_nodes-1), with --num_nodes
master_addr=""         # address of node 0: required with --num_nodes (torchrun); with --hostfile DeepSpeed finds it
master_port=29500      # port on node 0, with --num_nodes or --hostfile
hostfile=""            # DeepSpeed hostfile ("host slots=N" lines): the DeepSpeed launcher starts every node from here
dtype=float32          # float32 | bfloat16 | float16: student, teacher and the DeepSpeed JSON's bf16/fp16 together
zero=0                 # 2 | 3: DeepSpeed with conf/ds_zero<N>.json (implies --backend deepspeed); 0: as --backend says
resume=auto            # auto: an interrupted stage continues from its last checkpoint (a finished one starts over) | never
skip_bad=false         # true: corpus prep writes bad items (missing audio, empty text ...) to a side file instead of stopping
