"""Query a running `vllm serve` with the openai client: completion, chat, and a streamed reply."""

import argparse
import time
import urllib.request

from openai import OpenAI


def wait_healthy(base: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(base.removesuffix("/v1") + "/health", timeout=2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit(f"server at {base} did not become healthy in {timeout:.0f} s")
            time.sleep(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--wait", type=float, default=300.0, help="seconds to wait for /health")
    args = parser.parse_args()
    wait_healthy(args.base_url, args.wait)
    client = OpenAI(base_url=args.base_url, api_key="unused")
    model = client.models.list().data[0].id
    print(f"model: {model}")
    completion = client.completions.create(
        model=model, prompt="The weather today is", max_tokens=24, temperature=0
    )
    print(f"completion: {completion.choices[0].text!r}")
    chat = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Say hello."}], max_tokens=24,
        temperature=0,
    )
    print(f"chat: {chat.choices[0].message.content!r}")
    stream = client.completions.create(
        model=model, prompt="Once upon a time", max_tokens=24, temperature=0, stream=True
    )
    print("stream: ", end="", flush=True)
    for chunk in stream:
        print(repr(chunk.choices[0].text), end=" ", flush=True)
    print()


if __name__ == "__main__":
    main()
