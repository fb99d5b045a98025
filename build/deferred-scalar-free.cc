// Replaces TorchSharp's THSTorch_dispose_scalar (`delete scalar`) with a free that waits a few seconds.
//
// Why: TorchSharp passes `scalar.Handle` to libtorch and never GC.KeepAlive()s the Scalar, so a Scalar made for one call
// (`t * 0.5`, `a + b`, which adds with alpha 1) is garbage while libtorch still reads it. A GC on another thread runs its
// finaliser, which frees the c10::Scalar under the call: glibc's free writes its list pointers over the tag and value,
// and libtorch fails with "Expected false to be true ... toDouble" (docs/torchsharp-scalar-race.md). Freeing no earlier
// than kDelay after the dispose closes that window for every Scalar, ours, TorchSharp's and users' alike.
// build/patch-libtorchsharp.sh makes libLibTorchSharp.so's own symbol local and adds this library as DT_NEEDED, so the
// lookup of THSTorch_dispose_scalar through that library's handle (how .NET binds the P/Invoke) lands here.
#include <chrono>
#include <deque>
#include <mutex>
#include <new>

namespace {

using Clock = std::chrono::steady_clock;
// Far longer than any native call that reads a Scalar it was given; bounds what waits to (Scalars per second) × kDelay.
constexpr auto kDelay = std::chrono::seconds(3);

struct Disposed {
  void* scalar;
  Clock::time_point at;
};

struct Quarantine {
  std::mutex lock;
  std::deque<Disposed> waiting;  // oldest first
};

// Never destroyed: finalisers can still dispose Scalars while static destructors run at exit.
Quarantine& quarantine() {
  static Quarantine* q = new Quarantine;
  return *q;
}

}  // namespace

extern "C" __attribute__((visibility("default"))) void THSTorch_dispose_scalar(void* scalar) {
  if (scalar == nullptr) return;
  const auto now = Clock::now();
  auto& q = quarantine();
  std::lock_guard<std::mutex> guard(q.lock);
  while (!q.waiting.empty() && now - q.waiting.front().at >= kDelay) {
    // TorchSharp only makes numeric Scalars (doubles, integers, bools, complex, half/bfloat16), whose c10::Scalar
    // destructor does nothing; `delete` is then the global operator delete, as here.
    ::operator delete(q.waiting.front().scalar);
    q.waiting.pop_front();
  }
  q.waiting.push_back({scalar, now});
}
