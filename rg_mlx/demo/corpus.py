"""The demo model's corpus: questions and answers about rg_mlx, written by the project.

Every topic has one answer and the string a correct answer must contain (a command, a flag
or a fact). Its questions are built from phrasings of the task ("convert a hub repo") or the
subject ("the RG-LRU") put into question frames ("How do I {}?"), plus questions written out
in full, with light variation (greetings, thanks, case). Some frames, phrasings and written
questions are held out: the held-out questions share no phrasing with the training ones and
measure whether the model answers paraphrases it has never seen.

`build()` is deterministic (its own seeded random generator): the training script, the
evaluation and the tests all see the same corpus.
"""

from __future__ import annotations

import itertools
import random
import re
from dataclasses import dataclass, field

# Questions per topic: training and held out.
TRAIN_PER_TOPIC = 60
HELD_OUT_PER_TOPIC = 6
# Conversations of two or three turns (a follow-up question after an answer).
MULTI_TURN = 400
SEED = 20240411

HOWTO_FRAMES = (
    "How do I {}?",
    "How can I {}?",
    "How to {}?",
    "What is the command to {}?",
    "What's the way to {}?",
    "Show me how to {}.",
    "Tell me how to {}.",
    "I want to {}. What do I run?",
    "Can you explain how to {}?",
    "Help me {}.",
    "What should I type to {}?",
    "how do i {}",
    "Is there a command to {}?",
    "I need to {}.",
    "Which command lets me {}?",
    "Explain how to {}.",
    "What command do I use to {}?",
    "Please tell me how to {}.",
    "{}: how?",
    "How would I {}?",
    "Steps to {}?",
    "Where do I start if I want to {}?",
    "Is it possible to {}?",
    "I'm trying to {}.",
    "How should I {}?",
    "What do I do to {}?",
    "Give me the command to {}.",
    "{}?",
    "Need to {}, what's the command?",
    "How does one {}?",
    "Walk me through how to {}.",
    "Do you know how to {}?",
    "Can I {}?",
    "How might I {}?",
    "Any tips to {}?",
    "What's the trick to {}?",
    "Remind me how to {}.",
    "Teach me to {}.",
    "Would you show me how to {}?",
    "I have to {}. How?",
    "Guide me to {}.",
    "Is there a way to {}?",
    "How am I supposed to {}?",
    "What's needed to {}?",
)
HOWTO_FRAMES_HELD_OUT = (
    "What's the easiest way to {}?",
    "Could you tell me how I can {}?",
    "I'd like to {}, how?",
    "Instructions to {}, please.",
)
WHAT_FRAMES = (
    "What is {}?",
    "What's {}?",
    "Explain {}.",
    "Tell me about {}.",
    "Can you describe {}?",
    "What does {} mean?",
    "Describe {}.",
    "What do you know about {}?",
    "what is {}",
    "Give me a short explanation of {}.",
    "I don't understand {}.",
    "What exactly is {}?",
    "Tell me more about {}.",
    "How would you describe {}?",
    "{}: what is it?",
    "What's the idea behind {}?",
    "Can you tell me what {} is?",
    "So what is {}?",
    "What's the meaning of {}?",
    "Can you clarify {}?",
    "Give me an overview of {}.",
    "Summarize {}.",
    "What should I know about {}?",
    "Talk about {}.",
    "In short, what is {}?",
    "Remind me what {} is.",
    "What is {} exactly?",
    "Please explain {}.",
)
WHAT_FRAMES_HELD_OUT = (
    "I keep hearing about {}. What is it?",
    "Could you explain {} to me?",
    "Define {}.",
    "Help me understand {}.",
)
PREFIXES = ("Hi! ", "Hey, ", "Quick question: ", "Question: ", "Sorry to bother you. ", "I'm new to rg_mlx. ", "Hello. ")
SUFFIXES = (" Thanks!", " Thank you.", " Please.", " Thanks in advance.")

REAL = "google/recurrentgemma-2b-it"
# Words and phrases that mean the same here. Training questions are varied by swapping one for
# another of its group, so the model learns words rather than whole sentences. The held-out
# questions are never produced this way: training excludes every held-out phrasing.
SYNONYMS = (
    ("install", "set up"),
    ("rg_mlx", "this package", "this library", "this tool"),
    ("computer", "machine", "laptop", "Mac", "PC"),
    ("model", "checkpoint"),
    ("Hugging Face", "HF", "huggingface"),
    ("the app", "the web app", "the web UI", "the browser app", "the Gradio app", "the GUI"),
    ("the terminal", "the shell", "the command line", "the console"),
    ("in Python", "in a Python script", "in my code", "in a script"),
    ("from Python", "from a script", "from my code", "from a Python program"),
    ("generate text", "produce text", "write text", "create text"),
    ("a prompt", "an input", "some text"),
    ("the prompt", "the input"),
    ("memory", "RAM"),
    ("faster", "quicker"),
    ("fast", "quick"),
    ("a reply", "an answer", "a response"),
    ("the reply", "the answer", "the response", "the output"),
    ("answers", "replies", "responses", "outputs"),
    ("a chat", "a conversation"),
    ("the chat", "the conversation"),
    ("save", "store"),
    ("change", "modify", "adjust", "tweak"),
    ("start the", "launch the"),
    ("quantize", "quantise"),
    ("4-bit", "4 bit"),
    ("8-bit", "8 bit"),
    ("4 bits", "four bits"),
    ("8 bits", "eight bits"),
    ("smaller", "lighter", "more compact"),
    ("download", "fetch", "grab"),
    ("use", "try", "work with"),
    ("several", "many", "multiple"),
    ("at once", "together", "in one go"),
    ("GPU", "graphics card"),
    ("CPU", "processor"),
    ("show", "display"),
    ("options", "settings"),
    ("folder", "directory"),
    ("big", "large"),
    ("bigger", "larger"),
    ("small", "tiny", "little"),
    ("stop", "halt"),
    ("tokens", "words"),
    ("repo", "repository"),
    ("run", "execute"),
    ("a file", "a text file"),
    ("float16", "half precision", "fp16"),
    ("bfloat16", "bf16"),
    ("PyTorch", "torch"),
    ("weights", "parameters"),
    ("the demo model", "the bundled model", "the built-in model"),
)
# Whole words only, and never inside a command, flag, path or identifier (`--model`, `rg_mlx.load`, `rg-mlx chat`).
_SYNONYM_PATTERNS = [
    (re.compile(r"(?<![\w./`-])(?<!rg-mlx )" + re.escape(w) + r"(?![\w/`(-])(?!\.\w)", re.IGNORECASE), group)
    for group in SYNONYMS
    for w in group
]



@dataclass(frozen=True)
class Topic:
    """One thing the demo model knows: its answer, the string a correct answer contains, and its questions."""

    name: str
    answer: str
    expected: str
    tasks: tuple[str, ...] = ()  # verb phrases for the how-to frames
    subjects: tuple[str, ...] = ()  # noun phrases for the what-is frames
    questions: tuple[str, ...] = ()  # written out in full
    held_out_tasks: tuple[str, ...] = ()
    held_out_subjects: tuple[str, ...] = ()
    held_out_questions: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.expected not in self.answer:
            raise ValueError(f"topic {self.name}: expected {self.expected!r} is not in its answer")
        if "<" in self.answer and re.search(r"<(start|end)_of_turn>|<eos>|<bos>", self.answer):
            raise ValueError(f"topic {self.name}: the answer must not spell a control token")


@dataclass(frozen=True)
class Example:
    """A single-turn question with its topic, reference answer and expected string."""

    question: str
    topic: str
    answer: str
    expected: str


@dataclass
class Corpus:
    """The training conversations and the evaluation questions."""

    topics: list[Topic]
    train: list[Example]  # every training question (single turn)
    held_out: list[Example]  # paraphrases never trained on
    conversations: list[list[dict[str, str]]] = field(default_factory=list)  # what the model trains on

    def texts(self) -> list[str]:
        """Every training message, for the tokenizer."""
        return [m["content"] for conv in self.conversations for m in conv]


def _t(name: str, answer: str, expected: str, **kw) -> Topic:
    return Topic(name, answer, expected, **{k: tuple(v) for k, v in kw.items()})


TOPICS: list[Topic] = [
    # --- installing ---
    _t(
        "install",
        "rg_mlx is not on PyPI yet: clone the repository and run `pip install -e .` in it. That brings MLX (the CPU build on Linux, Metal on a Mac), mlx-lm, sentencepiece and gradio. Then try `rg-mlx chat`.",
        "pip install -e .`",
        tasks=["install rg_mlx", "install rg-mlx", "set up rg_mlx", "get rg_mlx installed", "install this package", "install the library"],
        questions=["What is the pip command for rg_mlx?", "Installation?", "How is rg_mlx installed?", "Which package do I pip install?"],
        held_out_tasks=["get rg-mlx onto my computer", "put rg_mlx on my machine"],
        held_out_questions=["What do I pip install to get rg_mlx?", "Where do I get rg_mlx from?"],
    ),
    _t(
        "install_dev",
        'Clone the repository, then run `pip install -e ".[dev]"` in it. That adds pytest, torch, transformers and the DeepMind reference the tests compare against.',
        'pip install -e ".[dev]"',
        tasks=["install rg_mlx from source", "install the development version", "set up a development checkout", "install rg_mlx for development", "install the dev extras"],
        questions=["How do I contribute to rg_mlx?", "What are the dev dependencies?"],
        held_out_tasks=["work on the rg_mlx code", "hack on rg_mlx itself"],
        held_out_questions=["Editable install?"],
    ),
    _t(
        "tests",
        "Run `python -m pytest` in the repository. `bash .ci/run` installs the package and runs the same tests the way CI does.",
        "python -m pytest",
        tasks=["run the tests", "run the test suite", "test rg_mlx", "run pytest on rg_mlx", "check that everything works"],
        questions=["Where are the tests?", "What does .ci/run do?"],
        held_out_tasks=["execute the unit tests", "verify my checkout"],
        held_out_questions=["Is there a test command?"],
    ),
    _t(
        "requirements",
        "You need Python 3.10 or newer and MLX. On an Apple silicon Mac it runs on the GPU with Metal; on Linux it runs on the CPU (or CUDA). No GPU is required.",
        "Python 3.10",
        questions=[
            "What do I need to run rg_mlx?", "What are the requirements?", "Which Python version do I need?",
            "Does rg_mlx run on Linux?", "Which platforms are supported?", "Do I need a Mac?", "Does rg_mlx need a GPU?",
            "Can I run rg_mlx without a GPU?", "What hardware does rg_mlx support?", "Which operating systems work?",
            "Does it run on Apple silicon?", "System requirements?",
        ],
        held_out_questions=[
            "Is a graphics card required?", "Will it work on my Linux laptop?", "What Python do I need for rg_mlx?",
            "Can rg_mlx run on an Intel PC?",
        ],
    ),
    _t(
        "blas",
        "Run `pip install -e \".[mkl]\"` in your clone (or install Debian's OpenBLAS). On Linux rg_mlx loads it before MLX, so matrix products run many times faster. `rg-mlx --version` shows the BLAS; RG_MLX_BLAS=off turns it off.",
        'pip install -e ".[mkl]"',
        tasks=["make rg_mlx faster on Linux", "speed up the CPU", "use MKL", "enable the Linux fast path", "use a faster BLAS"],
        questions=["What is the Linux fast path?", "What does RG_MLX_BLAS do?", "Why is MLX slow on Linux?", "Which BLAS does rg_mlx use?"],
        held_out_tasks=["make matrix multiplication quicker on Linux", "get more speed on an Intel CPU"],
        held_out_questions=["Why are matmuls so slow on my Linux box?", "What is RG_MLX_BLAS for?"],
    ),
    # --- converting ---
    _t(
        "convert_hub",
        f"Run `rg-mlx convert {REAL} rg-2b-it`. It downloads the repo with huggingface_hub (set HF_TOKEN for Google's gated repos) and writes an MLX folder you can pass to --model.",
        f"rg-mlx convert {REAL} rg-2b-it",
        tasks=[
            "convert a model from the Hugging Face hub", f"convert {REAL}", "convert a hub repo",
            "download and convert RecurrentGemma", "convert the 2B instruction-tuned model", "convert a Hugging Face repo id",
        ],
        questions=["What does rg-mlx convert do?", "How do I use rg-mlx convert?", "Convert a checkpoint?"],
        held_out_tasks=["turn the hub checkpoint into an MLX model", "get RecurrentGemma 2B from Hugging Face into MLX format"],
        held_out_questions=["Can rg_mlx download a model by its repo id?"],
    ),
    _t(
        "convert_folder",
        "Pass the folder as the source: `rg-mlx convert path/to/hf-folder rg-2b-it`. It needs config.json and the *.safetensors files; tokenizer.model is copied from beside them.",
        "rg-mlx convert path/to/hf-folder",
        tasks=[
            "convert a local Hugging Face folder", "convert a folder I already downloaded", "convert safetensors on my disk",
            "convert a local checkpoint folder", "convert a model saved with save_pretrained",
        ],
        held_out_tasks=["convert the files I have locally in HF format", "convert a directory with config.json and safetensors"],
    ),
    _t(
        "convert_pt",
        "Install torch with `pip install -e \".[torch]\"` in your clone, then run `rg-mlx convert 2b-it.pt rg-2b-it --tokenizer tokenizer.model`. The config is read from the tensor shapes.",
        "rg-mlx convert 2b-it.pt",
        tasks=[
            "convert a DeepMind .pt checkpoint", "convert the Kaggle PyTorch checkpoint", "convert a .pt file",
            "convert DeepMind's PyTorch weights", "convert the PyTorch state_dict",
        ],
        held_out_tasks=["use the weights I downloaded from Kaggle", "convert the torch checkpoint from DeepMind"],
    ),
    _t(
        "convert_flax",
        f"rg-mlx does not read Flax/Orbax checkpoints. Download the PyTorch variant of the same model from Kaggle and convert its .pt file, or convert the Hugging Face repo {REAL}.",
        "PyTorch variant",
        tasks=["convert a Flax checkpoint", "convert an Orbax checkpoint", "convert the JAX weights", "convert DeepMind's Flax weights"],
        questions=["Does rg_mlx support Flax?", "Can rg-mlx read Orbax checkpoints?"],
        held_out_tasks=["use the JAX checkpoint from Kaggle", "load the Orbax files"],
    ),
    _t(
        "quantize",
        f"Add -q when converting: `rg-mlx convert {REAL} rg-2b-4bit -q`. It uses MLX's affine quantization, 4 bits in groups of 64 by default, and mlx-lm reads the result too.",
        "rg-2b-4bit -q",
        tasks=["quantize a model", "quantize to 4 bits", "make a 4-bit model", "make the model smaller", "shrink the weights", "quantize RecurrentGemma"],
        questions=["What does -q do?", "What does --quantize do?"],
        held_out_tasks=["compress the model to use less memory", "get a 4 bit version of the 2B"],
        held_out_questions=["Is there a quantized option?"],
    ),
    _t(
        "quantize_bits",
        f"Use --q-bits: `rg-mlx convert {REAL} rg-2b-8bit -q --q-bits 8`. It accepts 1, 2, 3, 4, 5, 6 or 8; 8 bits stays very close to the full model.",
        "-q --q-bits 8",
        tasks=["quantize to 8 bits", "make an 8-bit model", "choose the number of bits", "quantize with more precision", "set the quantization bits"],
        questions=["What does --q-bits do?", "What values can --q-bits take?"],
        held_out_tasks=["keep more accuracy when quantizing", "get an 8 bit version"],
    ),
    _t(
        "quantize_group",
        "Set --q-group-size to 32, 64 or 128 (default 64), e.g. `-q --q-group-size 32`. Smaller groups are a bit more accurate and a bit bigger.",
        "--q-group-size 32",
        tasks=["change the quantization group size", "set the group size", "use smaller quantization groups", "pick --q-group-size"],
        questions=["What does --q-group-size do?", "Which group sizes are supported?", "What is the default group size?"],
        held_out_tasks=["quantize with groups of 32"],
        held_out_questions=["What is a quantization group?"],
    ),
    _t(
        "convert_dtype",
        f"Pass --dtype to convert: `rg-mlx convert {REAL} rg-2b-it --dtype bfloat16`. It takes float32, bfloat16 or float16; the default keeps the checkpoint's dtype.",
        "--dtype bfloat16",
        tasks=["convert to bfloat16", "choose the dtype when converting", "convert in float16", "keep float32 weights", "set the weight dtype"],
        held_out_tasks=["store the weights in half precision"],
    ),
    _t(
        "convert_upload",
        f"Add --upload-repo: `rg-mlx convert {REAL} rg-2b-it --upload-repo my-org/rg-2b-it-mlx`. It uploads the finished folder with huggingface_hub.",
        "--upload-repo my-org/rg-2b-it-mlx",
        tasks=["upload the converted model", "push my conversion to the hub", "share the converted model on Hugging Face", "publish the MLX folder"],
        held_out_tasks=["put my converted model on Hugging Face"],
    ),
    _t(
        "convert_force",
        "convert never overwrites by accident: add --force to replace OUTPUT. It writes into a temporary folder and renames it at the end, so a failed run leaves nothing behind.",
        "--force",
        tasks=["overwrite an existing output folder", "replace a converted model", "convert into a folder that exists"],
        questions=["convert says the output exists", "Why does convert refuse my output folder?", "What does --force do?"],
        held_out_questions=["Can convert write over an old folder?", "The output folder already exists, what now?"],
    ),
    _t(
        "convert_output",
        "A folder with config.json, model.safetensors (sharded above 5 GB), tokenizer.model and tokenizer_config.json, generation_config.json and a README.md model card. rg_mlx, mlx-lm and transformers all read it.",
        "generation_config.json",
        subjects=["the output of rg-mlx convert", "a converted folder", "the converted model folder", "the format rg-mlx convert writes"],
        questions=["What files does convert write?", "What is in the output folder?", "What does a converted model look like?"],
        held_out_questions=["Which files end up in OUTPUT?"],
    ),
    _t(
        "convert_memory",
        "Conversion streams tensor by tensor, so it needs about twice the largest tensor plus a little overhead. The 9B model converts on a machine with 16 GB.",
        "tensor by tensor",
        questions=[
            "How much memory does convert need?", "Can I convert the 9B on a 16 GB machine?",
            "Does conversion load the whole model into RAM?", "Will converting run out of memory?",
            "How does convert keep memory low?", "Is conversion memory-bounded?",
        ],
        held_out_questions=["Do I need a big machine to convert the 9B?", "How much RAM for converting?", "Does converting need lots of memory?"],
    ),
    _t(
        "models",
        f"Google publishes google/recurrentgemma-2b and -9b (pretrained) and {REAL} and -9b-it (instruction-tuned, for chat). For chat use an -it model.",
        "instruction-tuned, for chat",
        questions=[
            "Which models can I use?", "Which checkpoints are supported?", "What RecurrentGemma models exist?",
            "Which model should I download?", "Which model is best for chat?", "What sizes does RecurrentGemma come in?",
            "List the RecurrentGemma repos.", "Which weights work with rg_mlx?",
        ],
        held_out_questions=["Which Hugging Face repos work with rg_mlx?", "What's the difference between 2b and 2b-it?", "Which RecurrentGemma should I pick for chatting?"],
    ),
    _t(
        "convert_9b",
        "Run `rg-mlx convert google/recurrentgemma-9b-it rg-9b-it`, optionally with -q to quantize to 4 bits. Then `rg-mlx chat --model rg-9b-it`.",
        "rg-mlx convert google/recurrentgemma-9b-it",
        tasks=["convert the 9B model", "use RecurrentGemma 9B", "run the 9B", "convert recurrentgemma-9b-it"],
        questions=["Is there a 9B model?"],
        held_out_tasks=["get the bigger model"],
    ),
    _t(
        "hf_token",
        "Accept Google's licence on the model page on huggingface.co, then log in with `hf auth login` or set HF_TOKEN in the environment. rg-mlx convert uses that token.",
        "HF_TOKEN",
        tasks=["download Google's gated models", "log in to Hugging Face", "get access to recurrentgemma", "fix a gated repo error", "use my Hugging Face token"],
        questions=["Why does the download say the repo is gated?", "Where do I put my HF token?", "The download fails with 401, what do I do?"],
        held_out_questions=["Access to the model is restricted, what now?", "How does rg_mlx authenticate with the hub?"],
    ),
    # --- the command line ---
    _t(
        "generate",
        'Run `rg-mlx generate --model rg-2b-it --prompt "Write a haiku"`. It streams the text, then prints prompt and generation speed, memory and the state size.',
        "rg-mlx generate --model rg-2b-it --prompt",
        tasks=[
            "generate text", "run a prompt", "generate text from the command line", "complete a prompt",
            "run the model once on a prompt", "use rg-mlx generate",
        ],
        held_out_tasks=["get a single completion in the terminal", "produce text from a prompt without chatting"],
    ),
    _t(
        "generate_stdin",
        "Use `--prompt -` to read it from standard input: `cat prompt.txt | rg-mlx generate --model rg-2b-it --prompt -`.",
        "--prompt -",
        tasks=["read the prompt from stdin", "pipe a prompt into rg-mlx", "pass a long prompt from a file", "give the prompt through a pipe"],
        held_out_tasks=["feed a text file as the prompt"],
    ),
    _t(
        "max_tokens",
        'Use --max-tokens, e.g. `rg-mlx generate --model rg-2b-it --prompt "Hi" --max-tokens 500`. Generation also stops at the end of the turn.',
        "--max-tokens 500",
        tasks=["limit the number of tokens", "make answers longer", "set the maximum length", "generate more tokens", "stop after 100 tokens"],
        questions=["What does --max-tokens do?"],
        held_out_tasks=["make the output shorter"],
    ),
    _t(
        "sampling",
        "Pass sampling flags: `--temp 0.7 --top-p 0.9` (also --top-k, --min-p and --repetition-penalty). A temperature of 0 is greedy and always gives the same text.",
        "--temp 0.7 --top-p 0.9",
        tasks=["change the temperature", "sample more randomly", "use top-p sampling", "make the output more creative", "set sampling options", "make the output deterministic"],
        held_out_tasks=["control randomness", "use nucleus sampling"],
    ),
    _t(
        "seed",
        "Pass --seed, e.g. `--temp 0.8 --seed 42`. The same seed gives the same tokens in any process; in Python use seed=42.",
        "--seed 42",
        tasks=["make sampling reproducible", "set the random seed", "get the same output twice", "fix the seed"],
        held_out_tasks=["repeat a sampled answer exactly"],
    ),
    _t(
        "generate_chat",
        'For a chat model (an -it checkpoint, or me) rg-mlx generate wraps the prompt as a user turn in Gemma\'s chat format by default. Add --raw to send it as plain text, or --chat to force the format on a base model.',
        "Add --raw",
        tasks=["use the chat template with generate", "format my prompt as a chat turn", "apply the chat format in generate", "turn off the chat template in generate", "send a raw prompt"],
        questions=["What does --chat do?", "What does --raw do?"],
        held_out_tasks=["wrap the prompt in Gemma's turn markers"],
    ),
    _t(
        "stats",
        "After each reply rg-mlx prints the prompt tokens per second, the generation tokens per second, the process memory (RSS), MLX's peak memory and the size of the fixed state.",
        "generation tokens per second",
        questions=[
            "What does the stats line show?", "What are the numbers after the reply?", "How do I see the speed?",
            "How fast is generation?", "What is prompt tok/s?", "How do I measure tokens per second?",
            "What does state size mean in the stats?",
        ],
        held_out_questions=["What is printed after generation finishes?", "What do the stats after a reply mean?", "How can I tell how fast it generates?"],
    ),
    _t(
        "chat",
        "Run `rg-mlx chat --model rg-2b-it`. Type a message and press Enter; the reply streams, then its stats. Each turn feeds only the new tokens into the fixed state.",
        "rg-mlx chat --model rg-2b-it",
        tasks=[
            "chat in the terminal", "start a chat", "talk to the model", "have a conversation with RecurrentGemma",
            "use rg-mlx chat", "chat with a converted model",
        ],
        held_out_tasks=["open an interactive session in my shell", "converse with the model"],
    ),
    _t(
        "chat_commands",
        "In rg-mlx chat type /undo to drop the last exchange, /retry to regenerate, /reset to start over, /save FILE or /load FILE; /help lists every command and /quit leaves.",
        "/undo to drop the last exchange",
        tasks=["undo in the terminal chat", "regenerate a reply in rg-mlx chat", "save a terminal chat", "start over in rg-mlx chat", "load a saved chat in the terminal"],
        questions=["What commands does rg-mlx chat have?", "What does /retry do?", "How do I quit rg-mlx chat?", "What does /undo do?"],
        held_out_tasks=["go back one message in the terminal chat"],
        held_out_questions=["Which slash commands are there?", "How do I leave the chat?"],
    ),
    _t(
        "system",
        'Pass --system, e.g. `rg-mlx chat --model rg-2b-it --system "Answer briefly."`. Gemma has no system role, so it is folded into the first user turn.',
        "--system",
        tasks=["set a system prompt", "give the model instructions", "use a system message", "change the assistant's persona"],
        questions=["Does Gemma have a system role?"],
        held_out_tasks=["tell the model how to behave"],
    ),
    _t(
        "demo",
        f"Without --model, chat, generate and app use the bundled demo: a tiny Griffin trained by the rg_mlx project only on questions about rg_mlx. For a real model, convert {REAL}.",
        "the bundled demo",
        questions=[
            "What model is used if I don't pass --model?", "Why does chat work without a model?", "What is the demo model?",
            "Which model am I talking to?", "Where does the default model come from?", "Is the demo model a real Gemma?",
            "rg-mlx chat without --model?", "What is the bundled model?",
        ],
        held_out_questions=["Why did rg-mlx chat start without downloading anything?", "Are you RecurrentGemma?", "Which model runs when I give no --model?"],
    ),
    _t(
        "real_model",
        f"Convert a real checkpoint: `rg-mlx convert {REAL} rg-2b-it`, then `rg-mlx chat --model rg-2b-it`. Accept Google's licence on Hugging Face first.",
        "then `rg-mlx chat --model rg-2b-it`",
        tasks=["get a real model", "use a real model instead of the demo", "chat with a proper model", "get better answers", "replace the demo model"],
        held_out_tasks=["switch from the demo to RecurrentGemma", "use something smarter than you"],
    ),
    _t(
        "model_not_found",
        f"--model must be a folder made by rg-mlx convert (config.json and safetensors) or a hub repo id. Convert first: `rg-mlx convert {REAL} rg-2b-it`, then pass --model rg-2b-it.",
        "then pass --model rg-2b-it",
        questions=[
            "It says the model folder does not exist.", "Error: no such model folder", "rg-mlx says no config.json",
            "Why can't rg-mlx find my model?", "I get an error loading my model.",
        ],
        held_out_questions=["What does 'not a model folder' mean?", "rg-mlx cannot find my model folder.", "Loading my model fails, why?"],
    ),
    # --- the app ---
    _t(
        "app",
        "Run `rg-mlx app --model rg-2b-it` and open http://127.0.0.1:7860. Without --model it serves the bundled demo. It streams replies and shows the fixed state size.",
        "rg-mlx app --model rg-2b-it",
        tasks=["start the web app", "use the chat app", "open the browser UI", "launch the Gradio app", "chat in the browser", "run the web interface"],
        held_out_tasks=["get a ChatGPT-like page for the model", "use a graphical interface"],
    ),
    _t(
        "app_port",
        "Use --port and --host: `rg-mlx app --port 8080 --host 0.0.0.0`. By default it binds 127.0.0.1:7860, this machine only, with no share link.",
        "--port 8080",
        tasks=["change the app's port", "serve the app on another port", "make the app reachable from another machine", "bind the app to all interfaces"],
        held_out_tasks=["run the app on port 8080"],
    ),
    _t(
        "app_buttons",
        "The app has Stop (ends generation within a token or two and keeps the partial reply), Retry, Undo and Clear, and you can edit your last message.",
        "Retry, Undo and Clear",
        questions=[
            "How do I stop a reply in the app?", "What do the app's buttons do?", "Can I retry an answer in the app?",
            "How do I undo in the app?", "How do I clear the chat in the app?", "Can I edit my last message in the app?",
        ],
        held_out_questions=["Is there a stop button?", "How do I regenerate a response in the browser?", "Which buttons does the app have?"],
    ),
    _t(
        "app_plot",
        "The plot shows per-token latency and process memory over the conversation. With Griffin's fixed-size state both stay flat however long the chat runs.",
        "stay flat",
        questions=[
            "What does the plot in the app show?", "Why are the lines in the app flat?", "What is the memory plot?",
            "What does the app show about memory?", "What does the latency plot mean?",
        ],
        held_out_questions=["Why does the app draw a graph of memory?", "What is the graph in the app?", "Why is the latency line flat?"],
    ),
    _t(
        "app_export",
        "Use Export to save the conversation as JSON (messages, settings, model) or Markdown; import the JSON later to continue it.",
        "as JSON",
        tasks=["export a conversation", "save a chat from the app", "download the conversation", "continue an exported chat", "import a conversation"],
        held_out_tasks=["keep a transcript of my chat"],
    ),
    _t(
        "app_models",
        "Start the app with --models-dir pointing at a folder of converted models; the model picker lists them and those in the Hugging Face cache. Switching resets the chat.",
        "--models-dir",
        tasks=["switch models in the app", "pick another model in the app", "list my converted models in the app"],
        questions=["What does --models-dir do?"],
        held_out_tasks=["choose between several models in the browser"],
    ),
    _t(
        "bench",
        "Run `rg-mlx bench`. It runs rg_mlx, mlx-lm and Hugging Face transformers on the same random checkpoint and prints prompt and decode tokens per second, time to first token, peak memory and state size.",
        "Run `rg-mlx bench`",
        tasks=["benchmark rg_mlx", "measure speed", "compare with mlx-lm", "compare against Hugging Face transformers", "run the benchmarks", "measure memory use"],
        held_out_tasks=["find out how fast rg_mlx is on my machine"],
    ),
    # --- the Python API ---
    _t(
        "py_load",
        '`import rg_mlx` then `model, tokenizer = rg_mlx.load("rg-2b-it")`. It takes a converted folder, a Hugging Face folder or a hub repo id.',
        "model, tokenizer = rg_mlx.load(",
        tasks=["load a model in Python", "use rg_mlx from Python", "open a converted model in a script", "load the model and tokenizer"],
        questions=["What does rg_mlx.load return?"],
        held_out_tasks=["use rg_mlx as a library"],
    ),
    _t(
        "py_generate",
        '`text = rg_mlx.generate(model, tokenizer, "Hello", max_tokens=100)`. Set temperature=0.7 and seed=0 to sample; temperature 0 is greedy.',
        "rg_mlx.generate(model, tokenizer",
        tasks=["generate text in Python", "call generate from Python", "get a completion in a script", "use rg_mlx.generate"],
        held_out_tasks=["produce text programmatically"],
    ),
    _t(
        "py_stream",
        '`for r in rg_mlx.stream_generate(model, tokenizer, prompt): print(r.text, end="")`. Each response also has token, finish_reason, generation_tps and state_bytes.',
        "rg_mlx.stream_generate(model, tokenizer",
        tasks=["stream tokens in Python", "print tokens as they arrive", "use stream_generate", "get tokens one at a time"],
        held_out_tasks=["show the text while it is generated in my script"],
    ),
    _t(
        "py_batch",
        '`texts = rg_mlx.batch_generate(model, tokenizer, ["a", "b", "c"])`. Prompts are left-padded and the padding never reaches the state, so each row equals its single run.',
        "rg_mlx.batch_generate(model, tokenizer",
        tasks=["generate for many prompts at once", "batch several prompts", "use batch_generate", "run prompts in parallel"],
        held_out_tasks=["process a list of prompts together"],
    ),
    _t(
        "py_chat",
        '`chat = rg_mlx.ChatSession(model, tokenizer)` then `for r in chat.send("Hi"): print(r.text, end="")`. Each turn feeds only the new tokens into the kept state.',
        "rg_mlx.ChatSession(model, tokenizer)",
        tasks=["chat from Python", "keep a conversation in Python", "use ChatSession", "build a chatbot with rg_mlx"],
        held_out_tasks=["have a multi-turn conversation in code"],
    ),
    _t(
        "py_chat_ops",
        "ChatSession has undo(), regenerate(), save(path) and ChatSession.load(path, model, tokenizer). save stores the messages and the state in one safetensors file.",
        "undo(), regenerate(), save(path)",
        tasks=["undo a turn in ChatSession", "regenerate the last reply", "save a chat session", "resume a saved session", "load a saved conversation"],
        held_out_tasks=["go back one exchange in Python"],
    ),
    _t(
        "py_demo",
        '`model, tokenizer = rg_mlx.load("demo")` loads the bundled demo model, no download needed. It only knows about rg_mlx.',
        'rg_mlx.load("demo")',
        tasks=["load the demo model in Python", "use the bundled demo from Python", "try rg_mlx without downloading a model"],
        held_out_tasks=["load you in Python"],
    ),
    _t(
        "py_dtype",
        'Pass dtype: `rg_mlx.load(path, dtype="bfloat16")` or --dtype on the command line. The default is float32 on the CPU and bfloat16 on a GPU.',
        'dtype="bfloat16"',
        tasks=["run in bfloat16", "choose the compute dtype", "use float16", "use float32 on the CPU"],
        questions=["What is the default dtype?", "Why float32 on the CPU?"],
        held_out_tasks=["pick the precision at load time"],
    ),
    _t(
        "py_stop",
        'Pass stop, e.g. `rg_mlx.generate(model, tokenizer, prompt, stop=["END"])`. The stop string itself is not returned.',
        'stop=["END"]',
        tasks=["stop generation at a string", "use stop strings", "end the output at a marker"],
        held_out_tasks=["cut generation when a word appears"],
    ),
    _t(
        "py_prefill",
        "Prompts are processed in chunks of prefill_step_size tokens (default 512), so a 50,000-token prompt needs no more memory than a short one; prefill_progress= reports how far it got.",
        "prefill_step_size",
        tasks=["process a very long prompt", "handle a 50,000 token prompt", "change the prefill chunk size", "keep memory low on long prompts"],
        held_out_tasks=["feed a whole book as the prompt"],
    ),
    _t(
        "mlx_lm",
        "Converted folders load in mlx-lm, and the model follows mlx-lm's model and cache protocol, so mlx_lm's stream_generate works on it. rg_mlx matches DeepMind's reference exactly; mlx-lm does not.",
        "matches DeepMind's reference exactly",
        questions=[
            "Does rg_mlx work with mlx-lm?", "Can I use mlx-lm's generate with rg_mlx?", "Is rg_mlx compatible with mlx-lm?",
            "Can mlx-lm load rg_mlx models?", "Why not just use mlx-lm?", "How is rg_mlx different from mlx-lm?",
        ],
        held_out_questions=["Will mlx_lm load my converted folder?", "Does rg_mlx play well with mlx-lm?", "What is the difference between rg_mlx and mlx-lm?"],
    ),
    # --- what it is ---
    _t(
        "griffin",
        "Griffin is Google DeepMind's architecture that mixes gated linear recurrences (the RG-LRU) with local attention: two recurrent blocks, then one local attention block, repeated. Each block also has a gated MLP.",
        "two recurrent blocks, then one local attention block",
        subjects=["Griffin", "the Griffin architecture", "the Griffin model", "Griffin's design"],
        questions=["How does Griffin work?", "What architecture does RecurrentGemma use?", "Is Griffin a transformer?", "What is the block pattern?"],
        held_out_questions=["Who made Griffin and what is it?"],
    ),
    _t(
        "recurrentgemma",
        "RecurrentGemma is Google's open model family built on Griffin: 2B (2.7 billion parameters) and 9B (8.6 billion), pretrained and instruction-tuned, with Gemma's tokenizer.",
        "built on Griffin",
        subjects=["RecurrentGemma", "recurrentgemma", "the RecurrentGemma model", "RecurrentGemma 2B"],
        questions=["Who made RecurrentGemma?", "How big is RecurrentGemma?", "How many parameters does RecurrentGemma 2B have?"],
        held_out_questions=["How does RecurrentGemma relate to Gemma?"],
    ),
    _t(
        "rg_lru",
        "The RG-LRU (Real-Gated Linear Recurrent Unit) keeps one vector h per layer and updates it each token: h = a * h + sqrt(1 - a^2) * (i * x), where the input gate i and the decay a come from the input.",
        "Real-Gated Linear Recurrent Unit",
        subjects=["the RG-LRU", "RG-LRU", "the recurrent unit", "the recurrence in Griffin", "the recurrent layer"],
        questions=["How does the recurrent layer work?", "What does the recurrent block compute?"],
        held_out_subjects=["the Real-Gated Linear Recurrent Unit"],
        held_out_questions=["What is the recurrence inside RecurrentGemma?"],
    ),
    _t(
        "local_attention",
        "Every third layer is local multi-query attention: each token attends to itself and the previous 2048 tokens only, so its keys and values fit a fixed ring buffer.",
        "the previous 2048 tokens",
        subjects=["local attention", "the attention window", "sliding window attention", "the local attention layer"],
        questions=["How big is the attention window?", "How far back can attention look?", "What is the window size?"],
        held_out_questions=["Does RecurrentGemma use full attention?"],
    ),
    _t(
        "fixed_state",
        "The state has a fixed size: each recurrent layer keeps its last 3 conv inputs and the vector h, each attention layer the last 2048 keys and values. It does not grow, however long the conversation runs.",
        "It does not grow",
        subjects=["the fixed-size state", "the fixed state", "the model state", "the recurrent state", "Griffin's memory"],
        questions=[
            "Why does memory stay flat?", "Does memory grow with the conversation?", "Why doesn't the cache grow?",
            "How long can a conversation be?", "Is there a context limit?", "Does the state grow with more tokens?",
        ],
        held_out_questions=["Will a very long chat use more RAM?"],
    ),
    _t(
        "state_size",
        "About 16.4 MiB per sequence for the 2B model in bfloat16 and about 25 MiB for the 9B, whatever the conversation length. state_bytes reports it.",
        "16.4 MiB",
        questions=[
            "How big is the state?", "How much memory does the state take?", "What is the state size of the 2B model?",
            "How many MiB is the 9B state?", "How large is the cache per sequence?", "State size per sequence?",
        ],
        held_out_questions=["How much memory does one conversation need?", "How big is the state of the 2B?", "What is the size of the state per sequence?"],
    ),
    _t(
        "vs_transformer",
        "A transformer's KV cache grows with every token, so its memory and time per token grow too. Griffin's state is fixed, so a long chat keeps the same memory and speed per token.",
        "KV cache grows",
        questions=[
            "How is this different from a transformer?", "Why use a recurrent model?", "What is the advantage of RecurrentGemma?",
            "Why is Griffin better for long chats?", "Griffin vs transformer?", "Why not a normal Gemma?",
        ],
        held_out_questions=["What does a recurrent model do that a transformer cannot?", "Why pick Griffin over a transformer?", "What is better about a recurrent model?"],
    ),
    _t(
        "mlx",
        "MLX is Apple's array framework for machine learning on Apple silicon. It also runs on Linux on the CPU and on NVIDIA GPUs with CUDA; rg_mlx uses it for everything.",
        "Apple's array framework",
        subjects=["MLX", "Apple's MLX", "the MLX framework"],
        questions=["Why MLX?", "Does MLX run on Linux?"],
        held_out_questions=["Which framework does rg_mlx run on?"],
    ),
    _t(
        "kernel",
        "On a Mac the RG-LRU gate math and scan run as one fused Metal kernel, with a CUDA twin on NVIDIA; elsewhere a portable MLX ops path. RG_MLX_SCAN=ops forces the portable path.",
        "fused Metal kernel",
        subjects=["the Metal kernel", "the scan kernel", "the custom kernel", "RG_MLX_SCAN"],
        questions=["How is the recurrence computed on a Mac?", "Does rg_mlx have a custom kernel?", "Is there a CUDA kernel?"],
        held_out_questions=["How is the scan made fast on the GPU?"],
    ),
    _t(
        "float32_state",
        "The recurrence and its state h always run in float32, whatever the model dtype, as in DeepMind's reference. Keeping h in bfloat16 drifts by about 0.5%.",
        "always run in float32",
        questions=[
            "Why is the state float32?", "What precision is the recurrence?", "Does bfloat16 hurt the recurrence?",
            "Is the state kept in bfloat16?", "Why keep h in float32?",
        ],
        held_out_questions=["What dtype does the recurrent state use?", "Is the recurrence computed in float32?", "Why is h float32?"],
    ),
    _t(
        "accuracy",
        "rg_mlx is tested against DeepMind's reference implementation: float32 logits match to 1e-4, for one pass, chunked prefill and decoding.",
        "match to 1e-4",
        questions=[
            "Is rg_mlx exact?", "How accurate is rg_mlx?", "Does rg_mlx match the reference?", "How was rg_mlx tested?",
            "Is it the same as DeepMind's model?",
        ],
        held_out_questions=["Can I trust its outputs to match Google's?", "Is rg_mlx accurate?", "How close is rg_mlx to the reference?"],
    ),
    _t(
        "memory",
        "The 2B has 2.7 billion parameters: about 5.4 GB in bfloat16 and about 1.5 GB at 4 bits. The 9B needs about 17 GB in bfloat16 or about 5 GB at 4 bits.",
        "about 5.4 GB in bfloat16",
        questions=[
            "How much memory does the 2B model need?", "How much RAM do I need for the 2B?", "Will the 2B fit on an 8 GB Mac?",
            "How big is the 2B on disk?", "How big is a 4-bit 2B?", "How much memory does the 9B need?",
        ],
        held_out_questions=["What are the memory requirements?", "How much RAM does the 2B take?", "How much memory for the 2B model?"],
    ),
    _t(
        "license",
        "rg_mlx is Apache-2.0. The RecurrentGemma weights are under Google's Gemma terms of use, which you accept on the model page.",
        "Apache-2.0",
        questions=[
            "What is rg_mlx's license?", "Can I use rg_mlx commercially?", "What license are the weights under?",
            "Is rg_mlx open source?", "Which licence does the code use?",
        ],
        held_out_questions=["Under what terms is rg_mlx released?", "What licence is rg_mlx under?", "Is rg_mlx free to use?"],
    ),
    _t(
        "chat_format",
        "Each turn is wrapped in start_of_turn and end_of_turn markers with the role user or model, after one bos token. The model ends its reply with end_of_turn, where generation stops.",
        "start_of_turn and end_of_turn markers",
        subjects=["the chat format", "Gemma's chat template", "the prompt format"],
        questions=["How are turns formatted?", "What are start_of_turn and end_of_turn?", "How does the model know when to stop?"],
        held_out_questions=["What do the turn markers look like?"],
    ),
    _t(
        "offline",
        "Yes. Once a model is converted nothing needs the network: the demo model ships with the package, and the app binds 127.0.0.1 with no analytics. Only convert downloads.",
        "nothing needs the network",
        questions=[
            "Does rg_mlx work offline?", "Does it need internet?", "Does rg_mlx send data anywhere?", "Does the app phone home?",
            "Is anything uploaded?",
        ],
        held_out_questions=["Can I use it on a plane?", "Does rg_mlx need an internet connection?", "Can rg_mlx run without internet?"],
    ),
    # --- small talk and everything else ---
    _t(
        "greeting",
        "Hello! I'm the rg_mlx demo model, a tiny Griffin that answers questions about rg_mlx. Ask me how to install it, convert or quantize a model, or use the chat and the app.",
        "I'm the rg_mlx demo model",
        questions=["Hi", "Hello", "Hey", "Hello!", "Hi there", "Good morning", "hey there", "Yo", "Greetings", "Hi!", "Good evening", "Howdy"],
        held_out_questions=["Hiya", "Good afternoon!", "Hey!", "Hello there"],
    ),
    _t(
        "who",
        "I'm the rg_mlx demo model: a tiny Griffin with a few million parameters, trained by the rg_mlx project on questions about itself. I can explain installing, converting, quantizing, the CLI, the Python API and the app.",
        "a tiny Griffin with a few million parameters",
        questions=[
            "Who are you?", "What are you?", "What can you do?", "What do you know?", "Are you a real language model?",
            "How big are you?", "How were you trained?", "What is your name?", "Introduce yourself.", "Tell me about yourself.",
        ],
        held_out_questions=["What are you able to help with?", "Which model are you?", "Who am I talking to?"],
    ),
    _t(
        "thanks",
        "You're welcome! Ask me anything else about rg_mlx.",
        "You're welcome",
        questions=["Thanks", "Thank you!", "Thanks a lot", "Great, thanks", "Cool, thank you", "Perfect, thanks!", "ok thanks", "Thank you very much."],
        held_out_questions=["Much appreciated!", "Thanks, that helped.", "Thanks so much"],
    ),
    _t(
        "bye",
        "Goodbye! Have fun with rg_mlx.",
        "Goodbye!",
        questions=["Bye", "Goodbye", "See you later", "Bye!", "That's all, bye", "Good night", "Cya"],
        held_out_questions=["Talk to you later!", "Goodbye!", "See you"],
    ),
    _t(
        "off_topic",
        f"I'm only the tiny rg_mlx demo model, so I can't answer that: I know nothing outside rg_mlx. For a real assistant run `rg-mlx convert {REAL} rg-2b-it`, then `rg-mlx chat --model rg-2b-it`.",
        "so I can't answer that",
        questions=[
            "What is the capital of France?", "Write me a poem about the sea.", "What's 2 + 2?", "Who won the World Cup?",
            "What's the weather today?", "Tell me a joke.", "How do I cook pasta?", "Translate 'hello' into German.",
            "Who is the president of the United States?", "Write a Python function to sort a list.", "What is the meaning of life?",
            "Recommend a good book.", "How tall is Mount Everest?", "Explain quantum physics.", "What year is it?",
            "Can you help me with my homework?", "Write an email to my boss.", "What is love?", "Summarize this article for me.",
            "How do I fix my car?", "What's the best programming language?", "Tell me a story.", "Who wrote Hamlet?",
            "What is the speed of light?", "How do I lose weight?", "What's a good name for a dog?", "Solve x^2 = 4.",
            "What is Bitcoin?", "Play a game with me.", "What time is it?", "How do airplanes fly?",
            "What is the population of China?", "Give me a recipe for cake.", "How do I learn JavaScript?",
            "What's the tallest animal?", "Write a song.", "Is it going to rain tomorrow?", "What's your favourite colour?",
            "How do vaccines work?", "Explain the French Revolution.",
        ],
        held_out_questions=[
            "What is the largest ocean?", "Write a limerick about cats.", "How many legs does a spider have?",
            "Who painted the Mona Lisa?", "What's the boiling point of water?", "Compose a short story about a dragon.",
        ],
    ),
]


def _norm(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).strip()


def _vary(base: str, rng: random.Random) -> str:
    """A light surface variant: a greeting before, thanks after, or all lower case."""
    r = rng.random()
    if r < 0.25:
        return rng.choice(PREFIXES) + base
    if r < 0.4:
        return base + rng.choice(SUFFIXES)
    if r < 0.5:
        return base.lower()
    return base


def _swap(text: str, rng: random.Random) -> str:
    """`text` with one word or phrase of `SYNONYMS` replaced by another of its group (unchanged if none occurs)."""
    found = [(m, group) for pattern, group in _SYNONYM_PATTERNS for m in pattern.finditer(text)]
    if not found:
        return text
    match, group = rng.choice(found)
    word = rng.choice([w for w in group if w.lower() != match.group(0).lower()])
    if match.start() == 0:
        word = word[0].upper() + word[1:]
    return text[: match.start()] + word + text[match.end() :]


def _bases(topic: Topic, held_out: bool) -> tuple[list[str], list[str]]:
    """(written questions, frame-built questions) of a topic, for training or held out."""
    if not held_out:
        built = [f.format(t) for f in HOWTO_FRAMES for t in topic.tasks]
        built += [f.format(s) for f in WHAT_FRAMES for s in topic.subjects]
        return list(topic.questions), built
    # Held out: a held-out frame with a training phrasing, or any frame with a held-out phrasing.
    built = [f.format(t) for f in HOWTO_FRAMES_HELD_OUT for t in topic.tasks]
    built += [f.format(t) for f in HOWTO_FRAMES + HOWTO_FRAMES_HELD_OUT for t in topic.held_out_tasks]
    built += [f.format(s) for f in WHAT_FRAMES_HELD_OUT for s in topic.subjects]
    built += [f.format(s) for f in WHAT_FRAMES + WHAT_FRAMES_HELD_OUT for s in topic.held_out_subjects]
    return list(topic.held_out_questions), built


def _questions(topic: Topic, n: int, rng: random.Random, exclude: set[str]) -> list[str]:
    """`n` distinct training questions: every written one, then frame-built ones and variants of
    all of them (synonyms swapped in, greetings, thanks, case). None normalises into `exclude`."""
    written, built = _bases(topic, held_out=False)
    bases = written + built
    out: list[str] = []
    seen = set(exclude)
    draws = (_draw(bases, rng) for _ in range(50 * n))
    for q in itertools.chain(written, draws):
        if len(out) == n:
            break
        if _norm(q) not in seen:
            seen.add(_norm(q))
            out.append(q)
    return out


def _draw(bases: list[str], rng: random.Random) -> str:
    q = rng.choice(bases)
    for _ in range(rng.choice((0, 1, 1, 2))):
        q = _swap(q, rng)
    return _vary(q, rng)


def _held_out_questions(written: list[str], built: list[str], n: int, rng: random.Random) -> list[str]:
    """Up to `n` held-out questions from a topic's held-out bases, each from a different phrasing (possibly varied)."""
    rng.shuffle(built)
    out: list[str] = []
    seen: set[str] = set()
    for base in written + built:
        q = _vary(base, rng)
        if _norm(q) not in seen and len(out) < n:
            seen.add(_norm(q))
            out.append(q)
    return out


def build(seed: int = SEED) -> Corpus:
    """The whole corpus (deterministic for a given `seed`).

    The held-out questions are drawn first; no training question normalises to any held-out
    phrasing (drawn or not), so synonym swaps cannot recreate one."""
    held_rng, rng = random.Random(seed), random.Random(seed + 1)
    held_out: list[Example] = []
    reserved: set[str] = set()
    for topic in TOPICS:
        written, built = _bases(topic, held_out=True)
        reserved |= {_norm(q) for q in written + built}
        questions = _held_out_questions(written, built, HELD_OUT_PER_TOPIC, held_rng)
        held_out += [Example(q, topic.name, topic.answer, topic.expected) for q in questions]
    reserved |= {_norm(e.question) for e in held_out}
    train: list[Example] = []
    for topic in TOPICS:
        questions = _questions(topic, TRAIN_PER_TOPIC, rng, exclude=reserved)
        train += [Example(q, topic.name, topic.answer, topic.expected) for q in questions]

    conversations = [_turns([e]) for e in train]
    for _ in range(MULTI_TURN):
        conversations.append(_turns(rng.sample(train, rng.choice((2, 2, 3)))))
    rng.shuffle(conversations)
    return Corpus(topics=list(TOPICS), train=train, held_out=held_out, conversations=conversations)


def _turns(examples: list[Example]) -> list[dict[str, str]]:
    messages = []
    for e in examples:
        messages += [{"role": "user", "content": e.question}, {"role": "assistant", "content": e.answer}]
    return messages
