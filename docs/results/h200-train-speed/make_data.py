"""The synthetic data of the device calls (run on this machine, copied to .gpu/): CLoT-like samples (the fixture's
CLoT image, ~450x500 px: one tile; a question and a 4-60 character joke: 300-375 tokens with the InternLM2 tokenizer),
the same at one fixed length, and the 7-tile workload (a 640x480 COCO photo: 3x2 tiles + thumbnail, ~1,920 tokens)."""
import json, random, shutil, os
S = '../shared/fixtures/data'
os.makedirs('.gpu/clot', exist_ok=True); os.makedirs('.gpu/long', exist_ok=True)
shutil.copy(f'{S}/clot/007aPnLRgy1h9bhf3l6i9j30ci0eldh5.jpg', '.gpu/clot/clot.jpg')
shutil.copy(f'{S}/images/mscoco_dog_000000319154.jpg', '.gpu/long/dog.jpg')
random.seed(0)
chars = "猜猜哪个夹的是狗屎我今天不想上班老板说加薪结果是梦一场猫咪看着鱼缸思考人生为什么周一总是来得这么快"
qs = ["请你根据这张图片，讲一个脑洞大开的梗", "看图说一个笑话", "这张图让你想到了什么好笑的事？"]
def clot(i, q, joke): return {"id": f"clot-{i}", "image": "clot.jpg", "conversations": [{"from": "human", "value": "<image>\n" + q}, {"from": "gpt", "value": joke}]}
with open('.gpu/clot/clot.jsonl', 'w') as f, open('.gpu/clot/clot_fixed.jsonl', 'w') as g:
    for i in range(2000):
        n = random.choice([4, 6, 8, 10, 12, 15, 20, 25, 30, 40, 60])
        joke = ''.join(random.choice(chars) for _ in range(n))
        f.write(json.dumps(clot(i, random.choice(qs), joke), ensure_ascii=False) + "\n")
        g.write(json.dumps(clot(i, qs[0], "猜猜哪个夹的是狗屎我今天不想上班老板说加薪"), ensure_ascii=False) + "\n")
random.seed(1)
words = "the dog sits on a wooden bench next to a red bicycle while people walk past in the afternoon light and a cat watches from the window".split()
with open('.gpu/long/long.jsonl', 'w') as f:
    for i in range(1000):
        ans = ' '.join(random.choice(words) for _ in range(random.randint(60, 90)))
        f.write(json.dumps({"id": f"long-{i}", "image": "dog.jpg", "conversations": [{"from": "human", "value": "<image>\nDescribe the picture in detail."}, {"from": "gpt", "value": ans}]}) + "\n")
