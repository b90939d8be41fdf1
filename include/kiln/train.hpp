// kiln/train.hpp — the training layer in one include: the trainer, its policies, every
// callback and logger.
#pragma once

#include "kiln/callbacks/early_stopping.hpp"
#include "kiln/callbacks/gradient_accumulation_scheduler.hpp"
#include "kiln/callbacks/lambda_callback.hpp"
#include "kiln/callbacks/learning_rate_monitor.hpp"
#include "kiln/callbacks/model_checkpoint.hpp"
#include "kiln/callbacks/model_summary.hpp"
#include "kiln/callbacks/nan_detector.hpp"
#include "kiln/callbacks/progress_bar.hpp"
#include "kiln/callbacks/throughput_monitor.hpp"
#include "kiln/callbacks/timer.hpp"
#include "kiln/kiln.hpp"
#include "kiln/loggers/csv.hpp"
#include "kiln/loggers/jsonl.hpp"
#include "kiln/loggers/tensorboard.hpp"
#include "kiln/train/trainer.hpp"
