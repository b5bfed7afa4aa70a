# make test | make demo | make bench | make train-long : each creates .venv and installs requirements.txt first.
# make test: the pytest suite, 6.5-8.3 min on 2 cores by host (2026-12-08); make demo: stages 0-6, then the pipeline's answer.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export TF_CPP_MIN_LOG_LEVEL := 3
export PYTHONUNBUFFERED := 1

# The demo: a synthetic LUNA16-format cohort at the geometry of real scans through stages 0-6 on a 2-core CPU
# (25.4-30 min with the install, 2026-12-08). Why each value: benchmarks/RESULTS.md, "The presets".
DEMO_WORK ?= work/demo
# 24 scans of 512 px, up to 16 nodules each, none empty: the test part holds 71 nodules (7 scans)
DEMO_SYNTH ?= --N_SCANS=24 --N_LIDC_SCANS=0 --SEED=0 --IMAGE_SIZE=512 "--PIXEL_SPACING_MM=(0.55,0.95)" \
              --MAX_NODULES=16 --EMPTY_EVERY=0 --N_WORKERS=2
DEMO_PRE ?= --N_WORKERS=2
# three input channels 2.5 mm apart (table.py's default is the thesis's single slice)
DEMO_TABLE ?= --CONTEXT_SLICES=3 --NEG_PER_SCAN=12 --N_WORKERS=2
DEMO_SPLIT ?= "--TEST_FOLDS=()" --VAL_FRACTION=0.15 --TEST_FRACTION=0.3
# 640 steps (a fixed number: the same result on any machine; MAX_MINUTES only a safety stop) on 192 px crops
# (validated every 4th epoch and at the last: the same 640 steps, and last.keras the same, in less time)
DEMO_TRAIN ?= --VARIANT=figure3 --BATCH_SIZE=8 --EPOCHS=16 --STEPS_PER_EPOCH=40 --MAX_MINUTES=30 --LR=0.001 --TRAIN_CROP=192 \
              --SAMPLING=nodule \
              --BN_REESTIMATE_BATCHES=4 --VAL_MAX_BATCHES=8 --VAL_EVERY=4
# stage 5 evaluates the model the 640 steps end with (best.keras is chosen on too few validation crops here)
DEMO_MODEL ?= last.keras
DEMO_POST ?= --SCANS=test "--SIZE_BINS=(5.0,10.0)" --MIN_COMPONENT_VOXELS=3 --MODEL=$(DEMO_WORK)/4_model/$(DEMO_MODEL)
# stage 6: 2000 steps on 30 mm patches of 1.25 mm, 30 image blobs a scan added, operating point at score 0.9
DEMO_FP ?= --PATCH_MM=30 --VOXEL_MM=1.25 --WIDTH=16 --EPOCHS=40 --STEPS_PER_EPOCH=50 --BATCH_SIZE=32 \
           --DENSE_NEG_PER_SCAN=60 --BLOB_CANDIDATES=30 --THRESHOLD=0.9 --MAX_MINUTES=20 \
           "--SIZE_BINS=(5.0,10.0)"
# the U-Net baseline gets the demo's training wall time (train_seconds in its 4_model/state.json), not its steps
BASELINE_MINUTES ?= $(shell $(PYTHON) -c "import json; print(round(json.load(open('$(DEMO_WORK)/4_model/state.json'))['train_seconds'] / 60, 2))" 2>/dev/null)
DEMO_BASELINE_TRAIN ?= $(DEMO_TRAIN) --VARIANT=unet --EPOCHS=1000 --MAX_MINUTES=$(BASELINE_MINUTES) \
                       --OUT_DIR=$(DEMO_WORK)/4_model_unet
DEMO_BASELINE_POST ?= $(DEMO_POST) --MODEL=$(DEMO_WORK)/4_model_unet/$(DEMO_MODEL) \
                      --PRED_DIR=$(DEMO_WORK)/5_predictions_unet --REPORT_DIR=$(DEMO_WORK)/5_report_unet

.PHONY: test demo demo-data demo-cv demo-transfer demo-baseline demo-context1 demo-ablation demo-appearance demo-appearance-ablation train-long bench install clean
install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

# the suite on both cores (pytest-xdist; the tests of one costly shared fixture stay on one worker: tests/conftest.py)
test: install
	$(PY) -m pytest -q -n 2 --dist loadgroup --durations=10 tests

# stage NAME SCRIPT ARGS-VARIABLE: run one stage with the preset in that variable, print its wall time
define stage
	@echo '== $(1): $(PY) $(2) --WORK_DIR=$(DEMO_WORK) $($(3))'
	@start=$$(date +%s); $(PY) $(2) --WORK_DIR=$(DEMO_WORK) $($(3)) || exit $$?; \
	  echo "== $(1) took $$(( $$(date +%s) - start )) s"; echo "$(1) $$(( $$(date +%s) - start ))" >> $(DEMO_WORK)/stage_times.txt
endef

# stages 0-3 of the demo (the data): also what train-long needs first (its test part is the demo's)
demo-data: install
	@mkdir -p $(DEMO_WORK) && rm -f $(DEMO_WORK)/stage_times.txt
	$(call stage,0 synthetic cohort,synthetic_ct.py,DEMO_SYNTH)
	$(call stage,1 preprocess,preprocess.py,DEMO_PRE)
	$(call stage,2 table,table.py,DEMO_TABLE)
	$(call stage,3 split,slice_idx.py,DEMO_SPLIT)

demo: demo-data
	$(call stage,4 train,nasnet_v2_train.py,DEMO_TRAIN)
	$(call stage,5 postprocess,postprocess.py,DEMO_POST)
	$(call stage,6 false-positive reduction,fp_reduction.py,DEMO_FP)
	@echo "stage times (s):"; cat $(DEMO_WORK)/stage_times.txt
	@$(PY) benchmarks/compare_runs.py --SUMMARY=$(DEMO_WORK)

# The U-Net baseline on the demo's data, same time budget, its own model and report folders.
demo-baseline: install
	@test -f $(DEMO_WORK)/4_model/state.json || { echo "run make demo first: the U-Net gets its training time"; exit 1; }
	@echo "U-Net time budget: $(BASELINE_MINUTES) min (the demo's training time)"
	$(call stage,4 train U-Net baseline,nasnet_v2_train.py,DEMO_BASELINE_TRAIN)
	$(call stage,5 postprocess U-Net baseline,postprocess.py,DEMO_BASELINE_POST)

# The thesis's single-slice input (CONTEXT_SLICES=1) on the demo's scans, patient split and training preset.
DEMO_CTX1_TABLE ?= $(DEMO_TABLE) --CONTEXT_SLICES=1 --OUT_DIR=$(DEMO_WORK)/2_table_ctx1
DEMO_CTX1_SPLIT ?= $(DEMO_SPLIT) --IN_DIR=$(DEMO_WORK)/2_table_ctx1 --OUT_DIR=$(DEMO_WORK)/3_split_ctx1
DEMO_CTX1_TRAIN ?= $(DEMO_TRAIN) --TABLE=$(DEMO_WORK)/2_table_ctx1/slices.h5 --SPLIT_DIR=$(DEMO_WORK)/3_split_ctx1 \
                   --OUT_DIR=$(DEMO_WORK)/4_model_ctx1
DEMO_CTX1_POST ?= $(DEMO_POST) --MODEL=$(DEMO_WORK)/4_model_ctx1/$(DEMO_MODEL) \
                  --PRED_DIR=$(DEMO_WORK)/5_predictions_ctx1 --REPORT_DIR=$(DEMO_WORK)/5_report_ctx1
demo-context1: install
	@test -f $(DEMO_WORK)/3_split/split.json || $(MAKE) demo-data
	$(call stage,2 table CONTEXT_SLICES=1,table.py,DEMO_CTX1_TABLE)
	$(call stage,3 split CONTEXT_SLICES=1,slice_idx.py,DEMO_CTX1_SPLIT)
	$(call stage,4 train CONTEXT_SLICES=1,nasnet_v2_train.py,DEMO_CTX1_TRAIN)
	$(call stage,5 postprocess CONTEXT_SLICES=1,postprocess.py,DEMO_CTX1_POST)

# Small-nodule levers on the demo's data and split: the thesis's slice sampling, and the stem tap (figure3_stem).
DEMO_ABL_POST = $(DEMO_POST) --MODEL=$(DEMO_WORK)/4_model_$(1)/$(DEMO_MODEL) --PRED_DIR=$(DEMO_WORK)/5_predictions_$(1) \
                --REPORT_DIR=$(DEMO_WORK)/5_report_$(1)
DEMO_ABL_SLICE_TRAIN ?= $(DEMO_TRAIN) --SAMPLING=slice --OUT_DIR=$(DEMO_WORK)/4_model_slice
DEMO_ABL_SLICE_POST ?= $(call DEMO_ABL_POST,slice)
DEMO_ABL_STEM_TRAIN ?= $(DEMO_TRAIN) --VARIANT=figure3_stem --OUT_DIR=$(DEMO_WORK)/4_model_stem
DEMO_ABL_STEM_POST ?= $(call DEMO_ABL_POST,stem)
demo-ablation: install
	@test -f $(DEMO_WORK)/5_report/metrics.json || { echo "run make demo first: its model is the reference"; exit 1; }
	$(call stage,4 train SAMPLING=slice,nasnet_v2_train.py,DEMO_ABL_SLICE_TRAIN)
	$(call stage,5 postprocess SAMPLING=slice,postprocess.py,DEMO_ABL_SLICE_POST)
	$(call stage,4 train stem tap,nasnet_v2_train.py,DEMO_ABL_STEM_TRAIN)
	$(call stage,5 postprocess stem tap,postprocess.py,DEMO_ABL_STEM_POST)
	$(PY) benchmarks/compare_runs.py "--RUNS=('demo=$(DEMO_WORK)/5_report','slice sampling=$(DEMO_WORK)/5_report_slice','stem tap=$(DEMO_WORK)/5_report_stem')" \
	  --OUT=$(DEMO_WORK)/ablation.md

# The demo's models on a held-out cohort of another look (benchmarks/appearance_check.py; nothing trained);
# -ablation: the demo retrained without intensity augmentation, tested on both, rescored by the demo's stage 6.
DEMO_NOINT_TRAIN ?= $(DEMO_TRAIN) --INTENSITY=False --OUT_DIR=$(DEMO_WORK)/4_model_noint
DEMO_NOINT_POST ?= $(call DEMO_ABL_POST,noint)
DEMO_NOINT_FP ?= $(DEMO_FP) --MODEL=$(DEMO_WORK)/6_fp_reduction/model.keras --CANDIDATES_DIR=$(DEMO_WORK)/5_report_noint \
                 --OUT_DIR=$(DEMO_WORK)/6_fp_reduction_noint
demo-appearance: install
	@test -f $(DEMO_WORK)/5_report/metrics.json || { echo "run make demo first: its models are tested"; exit 1; }
	$(PY) benchmarks/appearance_check.py --RUN=$(DEMO_WORK) --MODEL_FILE=$(DEMO_MODEL)
demo-appearance-ablation: install
	@test -f $(DEMO_WORK)/5_report/metrics.json || { echo "run make demo first: its data and stage-6 model are used"; exit 1; }
	$(call stage,4 train INTENSITY=False,nasnet_v2_train.py,DEMO_NOINT_TRAIN)
	$(call stage,5 postprocess INTENSITY=False,postprocess.py,DEMO_NOINT_POST)
	$(call stage,6 rescoring INTENSITY=False,fp_reduction.py,DEMO_NOINT_FP)
	$(PY) benchmarks/appearance_check.py --RUN=$(DEMO_WORK) --MODEL_FILE=$(DEMO_MODEL) --TAG=noint

# The demo's models on three held-out cohorts: other patients, a look outside training, small nodules on vessels
# (benchmarks/transfer_check.py; nothing trained; ~12 min on 2 cores)
demo-transfer: install
	@test -f $(DEMO_WORK)/6_fp_reduction/model.keras || { echo "run make demo first: its models are tested"; exit 1; }
	$(PY) benchmarks/transfer_check.py --RUN=$(DEMO_WORK) --MODEL_FILE=$(DEMO_MODEL)

# 3-fold cross-validation on the demo's cohort spread over 3 LUNA16 folds (scan i in subset i % 3, 8 scans each):
# each fold trains with the demo's presets on one fold, validates on the next and is scored on the third; one FROC
# over all 24 scans (cross_validate.py; 82 min on 2 cores, 2026-12-08; benchmarks/RESULTS.md).
CV_WORK ?= work/demo_cv
demo-cv: install
	$(MAKE) demo-data DEMO_WORK=$(CV_WORK) DEMO_SYNTH='$(DEMO_SYNTH) --N_SUBSETS=3'
	$(PY) cross_validate.py --WORK_DIR=$(CV_WORK) "--FOLDS=(0,1,2)" --MODEL_FILE=$(DEMO_MODEL) \
	  --TRAIN_ARGS='$(DEMO_TRAIN)' --POST_ARGS="--SIZE_BINS=(5.0,10.0) --MIN_COMPONENT_VOXELS=3" --FP_ARGS='$(DEMO_FP)'

# 4x the demo's cohort (its first 24 scans are the demo's), tested on the demo's test patients, 90 min of training
# (2 h 15 min in all on 2 cores, 2026-11-29, with the stage 6 of then; benchmarks/RESULTS.md).
LONG_WORK ?= work/long
LONG_MINUTES ?= 90
train-long: install
	@test -f $(DEMO_WORK)/3_split/split.json || $(MAKE) demo-data
	@mkdir -p $(LONG_WORK)
	$(MAKE) demo DEMO_WORK=$(LONG_WORK) DEMO_SYNTH='$(DEMO_SYNTH) --N_SCANS=96' \
	  DEMO_SPLIT='$(DEMO_SPLIT) --TEST_FROM=$(DEMO_WORK)/3_split/split.json' \
	  DEMO_TRAIN='$(DEMO_TRAIN) --EPOCHS=1000 --STEPS_PER_EPOCH=100 --MAX_MINUTES=$(LONG_MINUTES) --REDUCE_LR_PATIENCE=6 --VAL_EVERY=1'

bench: install
	$(PY) benchmarks/run_all.py

clean:
	rm -rf work benchmarks/results
