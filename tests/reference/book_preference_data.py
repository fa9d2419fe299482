"""The book's preference data (ch07/04_preference-tuning-with-dpo/create-preference-data-ollama.ipynb):
its `format_input`, prompt f-string and chosen/rejected assignment copied verbatim from
`generate_model_responses`, with the teacher's replies and the polite/impolite choices given
instead of `query_model` and `random.choice`.

Usage: book_preference_data.py ENTRIES.json CHOICES.json REPLIES.json
(CHOICES: "polite"/"impolite" per entry; REPLIES: the teacher's reply per entry)
Prints {"prompts": [the prompt per entry], "data": the entries with chosen and rejected}.
"""
import json
import sys


def format_input(entry):
    instruction_text = (
        f"Below is an instruction that describes a task. Write a response that "
        f"appropriately completes the request."
        f"\n\n### Instruction:\n{entry['instruction']}"
    )

    input_text = f"\n\n### Input:\n{entry['input']}" if entry["input"] else ""
    instruction_text + input_text

    return instruction_text + input_text


def generate_model_responses(json_data, choices, replies):
    prompts = []
    for i, entry in enumerate(json_data):
        politeness = choices[i]  # the notebook: random.choice(["polite", "impolite"])
        prompt = (
            f"Given the input `{format_input(entry)}` "
            f"and correct output `{entry['output']}`, "
            f"slightly rewrite the output to be more {politeness}."
            "Keep the modification minimal."
            "Only return return the generated response and nothing else."
        )
        prompts.append(prompt)
        response = replies[i]  # the notebook: query_model(prompt)

        if politeness == "polite":
            json_data[i]["chosen"] = response
            json_data[i]["rejected"] = entry["output"]
        else:
            json_data[i]["rejected"] = response
            json_data[i]["chosen"] = entry["output"]
    return prompts


def main():
    with open(sys.argv[1], "r") as file:
        json_data = json.load(file)
    with open(sys.argv[2]) as f:
        choices = json.load(f)
    with open(sys.argv[3]) as f:
        replies = json.load(f)
    prompts = generate_model_responses(json_data, choices, replies)
    print(json.dumps({"prompts": prompts, "data": json_data}))


if __name__ == "__main__":
    main()
