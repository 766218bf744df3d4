"""The names ``ablate`` writes into its stores, spelled once.

MLflow run tags and Optuna trial user attributes are how every process (workers on other
machines, ``ablate report``, ``ablate status``) finds and reads what another one recorded, so
each name lives here and nowhere else. Values are plain strings (MLflow tags) or JSON-able
values (Optuna user attributes).
"""

# ---- MLflow run tags -----------------------------------------------------------------------
ROLE = "ablate.role"              # "parent": one per ablate run/search invocation; "cell": one per cell or trial;
                                  # "latency": one per configuration measured by ablate latency (ablate/latency.py)
ROLE_LATENCY = "latency"
CONFIG_KEY = "ablate.config_key"  # latency runs: the configuration (all but the seed) they measured
LATENCY_PREFIX = "ablate.latency."  # + "<target>.machine": what a target's latency was measured on
KIND = "ablate.kind"              # parent runs: "grid" or "search"
STATE = "ablate.state"            # cell runs: RUNNING, then COMPLETE, PRUNED or FAIL (the ledger's words)
SPEC_FILE = "ablate.spec_file"    # the spec file as given on the command line
VARIED = "ablate.varied"          # cell runs: JSON list of the dotted settings the spec varies
GIT_COMMIT = "ablate.git_commit"  # the commit of the code that ran
HOST = "ablate.host"              # the machine that ran it
PID = "ablate.pid"                # parent runs of a local launch: the process id of the ablate command
PROCESS_START = "ablate.process_start"  # ... and when that process started: with the pid, names it despite pid reuse
PROCESS_SPACE = "ablate.process_space"  # ... and where its pid means that process (boot id and pid namespace)
INCOMPLETE = "ablate.incomplete"  # cell runs: set at creation, removed once its params and config.yaml are logged
DEVICE = "ablate.device"          # cpu, cuda:0, ...
DEVICE_NAME = "ablate.device_name"  # the kind of device: "cpu", or the GPU's name ("NVIDIA H100 80GB HBM3")
DATA_LOADER = "ablate.data_loader"  # which data path trained the cell: cache, folder, memory
COST_SOURCE = "ablate.cost_source"  # "analytic" (S²-MLP, paper §3.4) or "counted" (a timm model's forward pass)
PRECISION = "ablate.precision"    # what training computed in: bf16, fp16 (CUDA autocast) or fp32
THREADS = "ablate.threads"        # torch's CPU thread count while training (results depend on it)
DETERMINISTIC = "ablate.deterministic_algorithms"  # torch.are_deterministic_algorithms_enabled()
CUDNN_DETERMINISTIC = "ablate.cudnn_deterministic"  # torch.backends.cudnn.deterministic
CUDNN_BENCHMARK = "ablate.cudnn_benchmark"          # torch.backends.cudnn.benchmark
N_TRAIN = "ablate.n_train"        # training images the loader found
N_VAL = "ablate.n_val"            # validation images the loader found
N_TRAIN_EVAL = "ablate.n_train_eval"  # training images evaluated after every epoch (train_top1's fixed subset)
MICRO_BATCH = "ablate.micro_batch"  # images per forward/backward pass on each device (the split, not the cell)
PROCESSES = "ablate.processes"    # processes (GPUs) that trained the cell together
ACCUM_STEPS = "ablate.accum_steps"  # passes per process and optimizer step
TRIAL_NUMBER = "ablate.trial_number"  # the ledger trial a cell run belongs to
REUSED_FROM = "ablate.reused_from"    # a cell trained before (a repeated search trial, another spec's cell): the run it copies
REUSED_EXPERIMENT = "ablate.reused_experiment"  # ... and that run's experiment, where another spec trained it
OVERRIDES = "ablate.overrides"    # parent and cell runs started with --set: JSON of setting (or seeds) -> value
SPEC_NAME = "ablate.spec_name"    # parent and cell runs whose experiment is not named as the spec (--set, --name)
LAUNCHER = "ablate.launcher"      # parent runs: "slurm" when its workers are a Slurm job array (else absent: local)
SLURM_JOB = "ablate.slurm_job"    # parent runs of a Slurm launch: the Slurm job id of its array
SLURM_LOGS = "ablate.slurm_logs"  # parent runs of a Slurm launch: the folder of its tasks' logs

# ---- tags of MLflow and attributes of Optuna trials alike -----------------------------------
CELL_KEY = "ablate.cell_key"      # the cell's stable key (ablate.config.cell_key)
FAILURE = "ablate.failure"        # why a cell or trial failed, one line

# ---- Optuna trial user attributes (the ledger) ----------------------------------------------
WORKER = "ablate.worker"          # "host:pid" of the worker that claimed the trial
WORKER_SPACE = "ablate.worker_space"  # boot id and pid namespace of that worker: its pid means that process only there
VALUES = "ablate.values"          # grid trials: JSON of the cell's varied values
DUPLICATE = "ablate.duplicate_of" # a second enqueue of the same cell: the number of the trial that runs it
STUDY_KIND = "ablate.study_kind"  # study user attribute: "grid" or "search", so one name cannot serve both
SLURM_TASK = "ablate.slurm_task"  # the Slurm job ("JOB" or "ARRAYJOB_TASK") of the worker that claimed the trial
SLURM_LAUNCHES = "ablate.slurm_launches"  # study user attribute: JSON list of the Slurm launches of this spec

# ---- MLflow's own tag names that ablate sets ------------------------------------------------
PARENT_ID = "mlflow.parentRunId"
RUN_NAME = "mlflow.runName"
EXPERIMENT_KIND = "mlflow.experimentKind"  # experiments: "custom_model_development", MLflow's "Machine learning" kind
SHARED_VIEW = "mlflow.sharedViewState."    # experiments: prefix of a saved runs view; the tag is prefix + view key

# ---- values of MLflow's tags that ablate sets --------------------------------------------------
KIND_MACHINE_LEARNING = "custom_model_development"  # (not "genai_development", which opens on traces)
VIEW_KEY = "ablate"               # the key of ablate's saved view: ?viewStateShareKey=ablate opens it

# ---- kinds of spec (the KIND and STUDY_KIND values) -----------------------------------------
GRID = "grid"
SEARCH = "search"

# ---- metrics every cell run records (MLflow metric keys) ------------------------------------
VAL_TOP1 = "val_top1"             # validation top-1 accuracy, percent
VAL_TOP5 = "val_top5"
TRAIN_LOSS = "train_loss"         # per epoch: its step is the epoch
TRAIN_TOP1 = "train_top1"         # per epoch: top-1 on a fixed subset of the training split, evaluated like
                                  # the validation split (eval mode, no augmentation; train.eval_train_images)
TRAIN_LOSS_EVAL = "train_loss_eval"  # per epoch: the cross-entropy on that subset, as val_loss on validation
GAP_TOP1 = "gap_top1"             # final: train_top1 - val_top1 after the last epoch, percentage points
MACS = "macs"                     # analytic multiply-adds per image (paper §3.4)
FLOPS = "flops"
PARAMS = "params"
IMAGES_PER_SECOND = "images_per_second"
MFU = "mfu"
GPU_HOURS = "gpu_hours"

# ---- settings ablate itself reads by name ---------------------------------------------------
SEED = "train.seed"               # a configuration is a cell's settings without this one
EPOCHS = "train.epochs"
