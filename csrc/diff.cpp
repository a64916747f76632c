// fastrft._diff: a minimal token diff (Myers 1986, linear-space middle-snake divide and conquer).
//
// For a sample a[0:n] and its refinement b[0:m] it marks, for every token of b, whether the refiner changed it:
// the unchanged tokens form one longest common subsequence of a and b, so exactly m - LCS(a, b) are marked.
// Cost O((n + m) D) time and O(n + m) space, D = n + m - 2 LCS (insertions plus deletions).
//
// Budget: when D > max_d the pair counts as rewritten. Only its common prefix and suffix stay unchanged and
// every token between them is marked changed (no longer minimal unless D == n + m). The search stops as soon
// as D > max_d is certain, either from the multiset bound D >= n + m - 2 |a ∩ b| (unrelated pairs cost
// O(n + m)) or when the middle-snake search passes max_d / 2 in both directions (O((n + m) max_d)).
//
// A plain CPython extension (no PyTorch ABI). Tokens come as lists/tuples of ints or as 1-D integer buffers
// (int64 buffers are read in place). The batch call releases the GIL and spreads pairs over std::threads.
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <exception>
#include <string>
#include <thread>
#include <vector>

namespace {

using Token = int64_t;
using Index = Py_ssize_t;

// A front value no candidate can lose to; far from overflow when 1 is added.
constexpr Index kUnreached = PY_SSIZE_T_MIN / 4;

// A snake found by the middle-snake search: the diagonal run from (x0, y0) to (x1, y1).
struct Snake {
  Index x0, y0, x1, y1;
};

// Per-thread workspace: the forward and backward fronts and the hash table of the multiset bound.
class Differ {
 public:
  // Fills changed[0:m] (1 = changed). Returns false when D > max_d (max_d < 0: no budget).
  bool run(const Token* a, Index n, const Token* b, Index m, Index max_d, uint8_t* changed) {
    std::memset(changed, 1, static_cast<size_t>(m));
    trim(a, n, b, m, changed);
    if (n == 0 || m == 0) return true;
    if (max_d >= 0 && n + m > max_d && n + m - 2 * common_multiset(a, n, b, m) > max_d) return false;
    Snake snake;
    if (!middle_snake(a, n, b, m, max_d, &snake)) return false;
    std::memset(changed + snake.y0, 0, static_cast<size_t>(snake.y1 - snake.y0));
    align(a, snake.x0, b, snake.y0, changed);
    align(a + snake.x1, n - snake.x1, b + snake.y1, m - snake.y1, changed + snake.y1);
    return true;
  }

 private:
  // Strips the common prefix and suffix (always part of some LCS), marking them unchanged.
  static void trim(const Token*& a, Index& n, const Token*& b, Index& m, uint8_t*& changed) {
    Index p = 0;
    while (p < n && p < m && a[p] == b[p]) changed[p++] = 0;
    a += p, b += p, changed += p, n -= p, m -= p;
    while (n > 0 && m > 0 && a[n - 1] == b[m - 1]) changed[--m] = 0, --n;
  }

  // Marks one LCS of a[0:n], b[0:m] as unchanged (changed[] starts all 1). Recurses on the half before each
  // middle snake and loops on the half after it; each half has at most ceil(D / 2) edits, so depth is log D.
  void align(const Token* a, Index n, const Token* b, Index m, uint8_t* changed) {
    for (;;) {
      trim(a, n, b, m, changed);
      if (n == 0 || m == 0) return;
      Snake snake;
      middle_snake(a, n, b, m, -1, &snake);
      std::memset(changed + snake.y0, 0, static_cast<size_t>(snake.y1 - snake.y0));
      align(a, snake.x0, b, snake.y0, changed);
      a += snake.x1, n -= snake.x1, b += snake.y1, m -= snake.y1, changed += snake.y1;
    }
  }

  // |a ∩ b| as multisets: an upper bound on LCS(a, b). Open addressing with linear probing; a slot stays
  // occupied when its count drops to 0, so probe chains through it stay intact.
  Index common_multiset(const Token* a, Index n, const Token* b, Index m) {
    size_t capacity = 16;
    while (capacity < 2 * static_cast<size_t>(n)) capacity <<= 1;
    keys_.resize(capacity);
    counts_.assign(capacity, -1);  // -1: empty slot
    const size_t mask = capacity - 1;
    auto slot_of = [&](Token t) {
      size_t s = static_cast<size_t>((static_cast<uint64_t>(t) * 0x9E3779B97F4A7C15ull) >> 20) & mask;
      while (counts_[s] >= 0 && keys_[s] != t) s = (s + 1) & mask;
      return s;
    };
    for (Index i = 0; i < n; ++i) {
      const size_t s = slot_of(a[i]);
      if (counts_[s] < 0) keys_[s] = a[i], counts_[s] = 0;
      ++counts_[s];
    }
    Index common = 0;
    for (Index j = 0; j < m; ++j) {
      const size_t s = slot_of(b[j]);
      if (counts_[s] > 0) --counts_[s], ++common;
    }
    return common;
  }

  // Slides along diagonal k from x while tokens match, forward (from the start) or on the reversed sequences.
  template <bool kReverse>
  static Index slide(const Token* a, Index n, const Token* b, Index m, Index x, Index y) {
    if (kReverse) {
      while (x < n && y < m && a[n - 1 - x] == b[m - 1 - y]) ++x, ++y;
    } else {
      while (x < n && y < m && a[x] == b[y]) ++x, ++y;
    }
    return x;
  }

  // Diagonals k = x - y a d-edit path can end on inside the n x m grid: same parity as d.
  static void diagonal_range(Index d, Index n, Index m, Index* lo, Index* hi) {
    *lo = std::max(-d, -m);
    if ((*lo + d) & 1) ++*lo;
    *hi = std::min(d, n);
    if ((*hi + d) & 1) --*hi;
  }

  // One step d of the greedy search in one direction. v[k] is the furthest x on diagonal k reachable with d
  // edits (reversed coordinates for the backward search). Candidates are clamped to the grid: the cost to reach
  // a point never decreases along a diagonal, so the clamped point is reachable whenever the unclamped one is.
  // Calls found(k, x_before_slide, x_after_slide) for every diagonal; stops when it returns true.
  template <bool kReverse, typename Found>
  static bool step(const Token* a, Index n, const Token* b, Index m, Index d, Index* v, Found found) {
    Index lo, hi;
    diagonal_range(d, n, m, &lo, &hi);
    if (d == 0) {
      const Index x = slide<kReverse>(a, n, b, m, 0, 0);
      v[0] = x;
      return found(0, 0, x);
    }
    Index prev_lo, prev_hi;
    diagonal_range(d - 1, n, m, &prev_lo, &prev_hi);
    if (lo - 1 < prev_lo) v[lo - 1] = kUnreached;
    if (hi + 1 > prev_hi) v[hi + 1] = kUnreached;
    for (Index k = lo; k <= hi; k += 2) {
      const Index right = std::min(v[k - 1] + 1, n);  // delete a token of a: from diagonal k - 1
      const Index down = std::min(v[k + 1], m + k);   // insert a token of b: from diagonal k + 1
      const Index x = right > down ? right : down;
      const Index x_end = slide<kReverse>(a, n, b, m, x, x - k);
      v[k] = x_end;
      if (found(k, x, x_end)) return true;
    }
    return false;
  }

  // Finds a snake on an optimal path, splitting it into halves of ceil(D/2) and floor(D/2) edits. Returns
  // false, without a snake, when D > max_d (max_d < 0: no budget).
  bool middle_snake(const Token* a, Index n, const Token* b, Index m, Index max_d, Snake* snake) {
    const Index delta = n - m;
    const bool odd = delta & 1;
    // Diagonals run over [-m - 1, n + 1] in both directions (the backward one has the same grid shape).
    const size_t size = static_cast<size_t>(n + m + 3);
    if (fwd_.size() < size) fwd_.resize(size), bwd_.resize(size);
    Index* vf = fwd_.data() + m + 1;
    Index* vb = bwd_.data() + m + 1;
    for (Index d = 0;; ++d) {
      // Forward step d meets backward step d - 1 (D = 2d - 1, odd delta only).
      if (max_d >= 0 && 2 * d - 1 > max_d) return false;
      Index back_lo = 1, back_hi = 0;
      if (d > 0) diagonal_range(d - 1, n, m, &back_lo, &back_hi);
      const bool met_forward = step<false>(a, n, b, m, d, vf, [&](Index k, Index x, Index x_end) {
        const Index kr = delta - k;  // the same diagonal in reversed coordinates
        if (!odd || kr < back_lo || kr > back_hi || x_end + vb[kr] < n) return false;
        *snake = {x, x - k, x_end, x_end - k};
        return true;
      });
      if (met_forward) return true;
      // Backward step d meets forward step d (D = 2d, even delta only).
      if (max_d >= 0 && 2 * d > max_d) return false;
      Index fwd_lo, fwd_hi;
      diagonal_range(d, n, m, &fwd_lo, &fwd_hi);
      const bool met_backward = step<true>(a, n, b, m, d, vb, [&](Index kr, Index xr, Index xr_end) {
        const Index k = delta - kr;
        if (odd || k < fwd_lo || k > fwd_hi || vf[k] + xr_end < n) return false;
        *snake = {n - xr_end, n - xr_end - k, n - xr, n - xr - k};
        return true;
      });
      if (met_backward) return true;
    }
  }

  std::vector<Index> fwd_, bwd_;
  std::vector<Token> keys_;
  std::vector<int32_t> counts_;
};

// Tokens of one sequence: an int64 buffer read in place, or a converted copy.
class TokenSeq {
 public:
  TokenSeq() = default;
  TokenSeq(const TokenSeq&) = delete;
  TokenSeq& operator=(const TokenSeq&) = delete;
  ~TokenSeq() {
    if (has_view_) PyBuffer_Release(&view_);
  }

  const Token* data() const { return data_; }
  Index size() const { return size_; }

  // Reads obj; on failure sets a Python exception that names `what` and returns false.
  bool parse(PyObject* obj, const std::string& what) {
    if (PyObject_CheckBuffer(obj) && !PyUnicode_Check(obj)) return parse_buffer(obj, what);
    PyObject* fast = PySequence_Fast(obj, "");
    if (fast == nullptr) {
      PyErr_Format(PyExc_ValueError, "%s must be a sequence of ints or a 1-D integer array, got %s", what.c_str(),
                   Py_TYPE(obj)->tp_name);
      return false;
    }
    const Index size = PySequence_Fast_GET_SIZE(fast);
    PyObject** items = PySequence_Fast_ITEMS(fast);
    owned_.resize(static_cast<size_t>(size));
    for (Index i = 0; i < size; ++i) {
      PyObject* item = items[i];
      if (!PyLong_Check(item) && (PyFloat_Check(item) || !PyIndex_Check(item))) {
        PyErr_Format(PyExc_ValueError, "%s: token %zd is a %s, not an integer", what.c_str(), i,
                     Py_TYPE(item)->tp_name);
        Py_DECREF(fast);
        return false;
      }
      const long long value = PyLong_AsLongLong(item);  // calls __index__ for integer-like objects
      if (value == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError, "%s: token %zd does not fit in int64", what.c_str(), i);
        Py_DECREF(fast);
        return false;
      }
      owned_[static_cast<size_t>(i)] = value;
    }
    Py_DECREF(fast);
    data_ = owned_.data();
    size_ = size;
    return true;
  }

 private:
  template <typename T>
  void copy_from(const void* src) {
    const T* typed = static_cast<const T*>(src);
    owned_.assign(typed, typed + size_);
    data_ = owned_.data();
  }

  bool parse_buffer(PyObject* obj, const std::string& what) {
    if (PyObject_GetBuffer(obj, &view_, PyBUF_FORMAT | PyBUF_C_CONTIGUOUS) != 0) {
      PyErr_Clear();
      PyErr_Format(PyExc_ValueError, "%s must be a C-contiguous 1-D integer array", what.c_str());
      return false;
    }
    has_view_ = true;
    if (view_.ndim != 1) {
      PyErr_Format(PyExc_ValueError, "%s must be 1-D, got %d dimensions", what.c_str(), view_.ndim);
      return false;
    }
    size_ = view_.shape[0];
    // Struct codes, with an optional byte-order/size prefix ('@', '=', '<').
    const char* format = view_.format != nullptr ? view_.format : "B";
    if (*format == '@' || *format == '=' || *format == '<') ++format;
    const char code = format[0];
    const bool single = code != '\0' && format[1] == '\0';
    const Py_ssize_t width = view_.itemsize;
    if (single && (code == 'q' || code == 'l') && width == 8) {
      data_ = static_cast<const Token*>(view_.buf);  // the fast path: read in place
    } else if (single && (code == 'i' || code == 'l') && width == 4) {
      copy_from<int32_t>(view_.buf);
    } else if (single && (code == 'I' || code == 'L') && width == 4) {
      copy_from<uint32_t>(view_.buf);
    } else if (single && code == 'h' && width == 2) {
      copy_from<int16_t>(view_.buf);
    } else if (single && code == 'H' && width == 2) {
      copy_from<uint16_t>(view_.buf);
    } else if (single && code == 'b' && width == 1) {
      copy_from<int8_t>(view_.buf);
    } else if (single && code == 'B' && width == 1) {
      copy_from<uint8_t>(view_.buf);
    } else {
      PyErr_Format(PyExc_ValueError, "%s must hold integers (int8..int64), got buffer format '%s'", what.c_str(),
                   view_.format != nullptr ? view_.format : "B");
      return false;
    }
    return true;
  }

  const Token* data_ = nullptr;
  Index size_ = 0;
  std::vector<Token> owned_;
  Py_buffer view_{};
  bool has_view_ = false;
};

bool parse_max_d(PyObject* obj, Index* max_d) {
  if (obj == Py_None) {
    *max_d = -1;
    return true;
  }
  *max_d = PyLong_AsSsize_t(obj);
  if (*max_d == -1 && PyErr_Occurred()) return false;
  if (*max_d < 0) {
    PyErr_SetString(PyExc_ValueError, "max_d must be >= 0 (or None for no budget)");
    return false;
  }
  return true;
}

PyObject* py_diff_mask(PyObject*, PyObject* args) {
  PyObject *sample_obj, *refined_obj, *max_d_obj = Py_None;
  if (!PyArg_ParseTuple(args, "OO|O:diff_mask", &sample_obj, &refined_obj, &max_d_obj)) return nullptr;
  Index max_d;
  if (!parse_max_d(max_d_obj, &max_d)) return nullptr;
  TokenSeq sample, refined;
  if (!sample.parse(sample_obj, "sample_ids") || !refined.parse(refined_obj, "refined_ids")) return nullptr;
  PyObject* mask = PyByteArray_FromStringAndSize(nullptr, refined.size());
  if (mask == nullptr) return nullptr;
  uint8_t* out = reinterpret_cast<uint8_t*>(PyByteArray_AS_STRING(mask));
  bool exact = true;
  bool failed = false;
  Py_BEGIN_ALLOW_THREADS
  try {
    Differ differ;
    exact = differ.run(sample.data(), sample.size(), refined.data(), refined.size(), max_d, out);
  } catch (const std::exception&) {
    failed = true;
  }
  Py_END_ALLOW_THREADS
  if (failed) {
    Py_DECREF(mask);
    return PyErr_NoMemory();
  }
  return Py_BuildValue("(NO)", mask, exact ? Py_True : Py_False);
}

PyObject* py_diff_masks(PyObject*, PyObject* args) {
  PyObject *samples_obj, *refineds_obj, *max_d_obj = Py_None;
  Py_ssize_t num_threads = 0;
  if (!PyArg_ParseTuple(args, "OO|On:diff_masks", &samples_obj, &refineds_obj, &max_d_obj, &num_threads)) {
    return nullptr;
  }
  Index max_d;
  if (!parse_max_d(max_d_obj, &max_d)) return nullptr;
  PyObject* samples = PySequence_Fast(samples_obj, "samples must be a sequence");
  if (samples == nullptr) return nullptr;
  PyObject* refineds = PySequence_Fast(refineds_obj, "refineds must be a sequence");
  if (refineds == nullptr) {
    Py_DECREF(samples);
    return nullptr;
  }
  const Index count = PySequence_Fast_GET_SIZE(samples);
  if (PySequence_Fast_GET_SIZE(refineds) != count) {
    PyErr_Format(PyExc_ValueError, "got %zd samples but %zd refinements", count, PySequence_Fast_GET_SIZE(refineds));
    Py_DECREF(samples);
    Py_DECREF(refineds);
    return nullptr;
  }
  std::vector<TokenSeq> sample_seqs(static_cast<size_t>(count)), refined_seqs(static_cast<size_t>(count));
  std::vector<Index> offsets(static_cast<size_t>(count) + 1, 0);
  bool parsed = true;
  for (Index i = 0; i < count && parsed; ++i) {
    parsed = sample_seqs[i].parse(PySequence_Fast_GET_ITEM(samples, i), "samples[" + std::to_string(i) + "]") &&
             refined_seqs[i].parse(PySequence_Fast_GET_ITEM(refineds, i), "refineds[" + std::to_string(i) + "]");
    if (parsed) offsets[i + 1] = offsets[i] + refined_seqs[i].size();
  }
  Py_DECREF(samples);
  Py_DECREF(refineds);
  if (!parsed) return nullptr;

  PyObject* masks = PyByteArray_FromStringAndSize(nullptr, offsets[count]);
  PyObject* exact = PyByteArray_FromStringAndSize(nullptr, count);
  if (masks == nullptr || exact == nullptr) {
    Py_XDECREF(masks);
    Py_XDECREF(exact);
    return nullptr;
  }
  uint8_t* mask_out = reinterpret_cast<uint8_t*>(PyByteArray_AS_STRING(masks));
  uint8_t* exact_out = reinterpret_cast<uint8_t*>(PyByteArray_AS_STRING(exact));
  std::atomic<Index> next{0};
  std::atomic<bool> failed{false};
  auto work = [&]() {
    try {
      Differ differ;  // workspace reused across the pairs this thread takes
      for (Index i = next.fetch_add(1); i < count; i = next.fetch_add(1)) {
        exact_out[i] = differ.run(sample_seqs[i].data(), sample_seqs[i].size(), refined_seqs[i].data(),
                                  refined_seqs[i].size(), max_d, mask_out + offsets[i]);
      }
    } catch (const std::exception&) {
      failed = true;
      next = count;
    }
  };
  Index threads = num_threads > 0 ? num_threads : static_cast<Index>(std::thread::hardware_concurrency());
  threads = std::max<Index>(1, std::min(threads, count));
  Py_BEGIN_ALLOW_THREADS
  std::vector<std::thread> pool;
  try {
    for (Index t = 1; t < threads; ++t) pool.emplace_back(work);
  } catch (const std::exception&) {
    // Could not start more threads: the ones running (and this one) take all the pairs.
  }
  work();
  for (std::thread& thread : pool) thread.join();
  Py_END_ALLOW_THREADS
  if (failed) {
    Py_DECREF(masks);
    Py_DECREF(exact);
    return PyErr_NoMemory();
  }
  return Py_BuildValue("(NN)", masks, exact);
}

PyMethodDef methods[] = {
    {"diff_mask", py_diff_mask, METH_VARARGS,
     "diff_mask(sample, refined, max_d=None) -> (bytearray, exact): 1 per changed token of refined."},
    {"diff_masks", py_diff_masks, METH_VARARGS,
     "diff_masks(samples, refineds, max_d=None, num_threads=0) -> (bytearray, bytearray): the masks of all "
     "pairs concatenated, and one exact flag per pair. num_threads=0 uses every hardware thread."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "fastrft._diff", "Minimal token diff (Myers, linear space).", -1,
                      methods};

}  // namespace

PyMODINIT_FUNC PyInit__diff(void) { return PyModule_Create(&module); }
