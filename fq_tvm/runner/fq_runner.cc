// fq-runner: runs an fq-tvm artifact without Python.
//
// The artifact's library (model.so) is a Relax VM executable exported as a shared library; it is
// loaded the way tvm.runtime.vm.VirtualMachine does it (TVM 0.27): ffi::Module::LoadFromFile, the
// library's "vm_load_executable", then "vm_initialization"(device type, device id, allocator) and
// the function "main". Before anything is loaded, the manifest is checked and every file it lists
// is verified against its sha256 (the rule of fq_tvm/artifact.py: only regular files, listed with
// a checksum, are opened). Inputs are .npy files (or an uncompressed .npz, as np.savez writes)
// named as the manifest's inputs; outputs are written as NAME.npy. Errors: one line, exit 1.
//
// Built by fq_tvm/bundle.py against the headers of the apache-tvm / apache-tvm-ffi wheels:
//   g++ -std=c++17 -O2 fq_runner.cc -I tvm_ffi/include -L lib -ltvm_runtime -ltvm_ffi
// Only tvm-ffi headers are used (tvm/runtime/tensor.h needs headers the wheel does not ship); the
// runtime library registers the VM and the library loader when it is loaded.

#include <dlpack/dlpack.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>
#include <tvm/ffi/any.h>
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/map.h>
#include <tvm/ffi/container/shape.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/json.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/string.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

namespace ffi = tvm::ffi;

#if defined(__aarch64__)
static const char* kArch = "aarch64";
#elif defined(__x86_64__)
static const char* kArch = "x86_64";
#else
#error "fq-runner is built for aarch64 or x86_64"
#endif

static const char* kUsage =
    "usage: fq-runner MODEL_DIR [-i INPUTS] [NAME=FILE.npy ...] [-o OUT_DIR] [--repeat N] [--warmup N] "
    "[--check]\n"
    "  MODEL_DIR    the fq-tvm artifact (manifest.json + model.so); every file is verified by sha256\n"
    "  -i INPUTS    an .npz (np.savez, not savez_compressed) or a directory of NAME.npy, or one .npy\n"
    "               for a model with one input; inputs are named as the manifest's inputs\n"
    "  NAME=FILE    the input NAME from a .npy file\n"
    "  -o OUT_DIR   write each output as OUT_DIR/NAME.npy (the directory is created)\n"
    "  --repeat N   timed runs after the warm-up (default 10); prints median / min / max ms\n"
    "  --warmup N   untimed runs first (default 2; at least 1: its outputs are the ones written)\n"
    "  --check      verify the artifact and exit\n"
    "Threads: TVM_NUM_THREADS=N (default: one per physical core).\n";

struct Fail : std::runtime_error {
  explicit Fail(const std::string& msg) : std::runtime_error(msg) {}
};
[[noreturn]] static void fail(const std::string& msg) { throw Fail(msg); }

// ---- files -------------------------------------------------------------------------------------

static const size_t kMaxManifest = 8u << 20;

// The whole file (or each chunk given to `sink`), only if it is a regular file reached without
// following a symbolic link.
static std::string read_regular(const std::string& path, size_t limit = SIZE_MAX,
                                const std::function<void(const char*, size_t)>& sink = nullptr) {
  int fd = open(path.c_str(), O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
  if (fd < 0) {
    if (errno == ELOOP) fail(path + ": is a symbolic link; an artifact holds regular files only");
    fail(path + ": cannot open (" + std::strerror(errno) + ")");
  }
  struct stat st;
  if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    close(fd);
    fail(path + ": not a regular file");
  }
  std::string data;
  char buf[1 << 16];
  for (;;) {
    ssize_t n = read(fd, buf, sizeof(buf));
    if (n < 0) {
      if (errno == EINTR) continue;
      int err = errno;
      close(fd);
      fail(path + ": cannot read (" + std::strerror(err) + ")");
    }
    if (n == 0) break;
    if (sink) {
      sink(buf, static_cast<size_t>(n));
      continue;
    }
    data.append(buf, static_cast<size_t>(n));
    if (data.size() > limit) {
      close(fd);
      fail(path + ": larger than " + std::to_string(limit) + " bytes");
    }
  }
  close(fd);
  return data;
}

static bool exists(const std::string& path) {
  struct stat st;
  return lstat(path.c_str(), &st) == 0;
}

static bool is_dir(const std::string& path) {
  struct stat st;
  return stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

static bool ends_with(const std::string& s, const std::string& tail) {
  return s.size() >= tail.size() && s.compare(s.size() - tail.size(), tail.size(), tail) == 0;
}

// ---- sha256 (FIPS 180-4) -----------------------------------------------------------------------

class Sha256 {
 public:
  void update(const void* data, size_t n) {
    const unsigned char* p = static_cast<const unsigned char*>(data);
    total_ += n;
    while (n > 0) {
      size_t take = std::min(n, size_t(64) - fill_);
      std::memcpy(buf_ + fill_, p, take);
      fill_ += take, p += take, n -= take;
      if (fill_ == 64) block(buf_), fill_ = 0;
    }
  }
  std::string hex() {
    uint64_t bits = total_ * 8;
    unsigned char pad[72] = {0x80};
    size_t len = (fill_ < 56 ? 56 : 120) - fill_;
    for (int i = 0; i < 8; ++i) pad[len + i] = static_cast<unsigned char>(bits >> (56 - 8 * i));
    update(pad, len + 8);
    static const char* digits = "0123456789abcdef";
    std::string out;
    for (uint32_t v : h_)
      for (int i = 28; i >= 0; i -= 4) out += digits[(v >> i) & 0xf];
    return out;
  }

 private:
  static uint32_t rotr(uint32_t x, int n) { return (x >> n) | (x << (32 - n)); }
  void block(const unsigned char* p) {
    static const uint32_t k[64] = {
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
        0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
        0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
        0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
        0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
        0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
        0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
        0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2};
    uint32_t w[64];
    for (int i = 0; i < 16; ++i)
      w[i] = (uint32_t(p[4 * i]) << 24) | (uint32_t(p[4 * i + 1]) << 16) | (uint32_t(p[4 * i + 2]) << 8) |
             uint32_t(p[4 * i + 3]);
    for (int i = 16; i < 64; ++i) {
      uint32_t s0 = rotr(w[i - 15], 7) ^ rotr(w[i - 15], 18) ^ (w[i - 15] >> 3);
      uint32_t s1 = rotr(w[i - 2], 17) ^ rotr(w[i - 2], 19) ^ (w[i - 2] >> 10);
      w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    uint32_t a = h_[0], b = h_[1], c = h_[2], d = h_[3], e = h_[4], f = h_[5], g = h_[6], h = h_[7];
    for (int i = 0; i < 64; ++i) {
      uint32_t t1 = h + (rotr(e, 6) ^ rotr(e, 11) ^ rotr(e, 25)) + ((e & f) ^ (~e & g)) + k[i] + w[i];
      uint32_t t2 = (rotr(a, 2) ^ rotr(a, 13) ^ rotr(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
      h = g, g = f, f = e, e = d + t1, d = c, c = b, b = a, a = t1 + t2;
    }
    h_[0] += a, h_[1] += b, h_[2] += c, h_[3] += d, h_[4] += e, h_[5] += f, h_[6] += g, h_[7] += h;
  }
  uint32_t h_[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
  unsigned char buf_[64];
  size_t fill_ = 0;
  uint64_t total_ = 0;
};

// sha256 of a regular file (no link, FIFO or device), read in chunks: a model of hundreds of MB
// is not held in memory twice.
static std::string sha256_file(const std::string& path) {
  Sha256 digest;
  read_regular(path, SIZE_MAX, [&](const char* data, size_t n) { digest.update(data, n); });
  return digest.hex();
}

// ---- the manifest ------------------------------------------------------------------------------

struct Spec {
  std::string name;
  DLDataType dtype;
  std::string dtype_name;
  std::vector<ffi::Any> shape;  // int64_t or string (a symbolic dim)
  bool has_range = false;
  int64_t low = 0, high = 0;
};

struct Manifest {
  std::string library;
  std::vector<Spec> inputs, outputs;
};

static DLDataType dtype_of(const std::string& name, bool* ok) {
  static const std::map<std::string, DLDataType> known = {
      {"float16", {kDLFloat, 16, 1}}, {"float32", {kDLFloat, 32, 1}}, {"float64", {kDLFloat, 64, 1}},
      {"int8", {kDLInt, 8, 1}},       {"int16", {kDLInt, 16, 1}},     {"int32", {kDLInt, 32, 1}},
      {"int64", {kDLInt, 64, 1}},     {"uint8", {kDLUInt, 8, 1}},     {"uint16", {kDLUInt, 16, 1}},
      {"uint32", {kDLUInt, 32, 1}},   {"uint64", {kDLUInt, 64, 1}},   {"bool", {kDLBool, 8, 1}}};
  auto it = known.find(name);
  *ok = it != known.end();
  return *ok ? it->second : DLDataType{0, 0, 0};
}

static std::string str_of(const ffi::json::Object& obj, const char* key) {
  auto it = obj.find(ffi::String(key));
  if (it == obj.end()) return "";
  auto s = (*it).second.try_cast<ffi::String>();
  return s ? std::string(*s) : "";
}

static bool plain_name(const std::string& n) {
  return !n.empty() && n != "." && n != ".." && n.find('/') == std::string::npos &&
         n.find('\\') == std::string::npos && n.find('\0') == std::string::npos && n != "manifest.json";
}

static std::vector<Spec> specs_of(const ffi::json::Object& m, const char* key, const std::string& where) {
  auto bad = [&](const std::string& why) -> void { fail(where + ": invalid manifest: " + why); };
  auto it = m.find(ffi::String(key));
  std::vector<Spec> out;
  if (it == m.end()) bad(std::string("'") + key + "' is missing");
  auto list = (*it).second.try_cast<ffi::json::Array>();
  if (!list || list->empty()) bad(std::string("'") + key + "' must be a non-empty list");
  for (const ffi::Any& item : *list) {
    auto obj = item.try_cast<ffi::json::Object>();
    if (!obj) bad(std::string("each of '") + key + "' must be an object");
    Spec s;
    s.name = str_of(*obj, "name");
    s.dtype_name = str_of(*obj, "dtype");
    bool ok = false;
    s.dtype = dtype_of(s.dtype_name, &ok);
    if (s.name.empty() || !ok) bad(std::string("each of '") + key + "' needs a 'name' and a numeric 'dtype'");
    auto sh = obj->find(ffi::String("shape"));
    auto dims = sh == obj->end() ? std::nullopt : (*sh).second.try_cast<ffi::json::Array>();
    if (!dims) bad("'" + s.name + "' needs a 'shape' list");
    for (const ffi::Any& d : *dims) {
      if (d.as<int64_t>().has_value() || d.as<ffi::String>().has_value()) {
        if (auto v = d.as<int64_t>(); v && *v < 0) bad("'" + s.name + "' has a negative dim");
        s.shape.push_back(d);
      } else {
        bad("'" + s.name + "' has a dim that is neither a size nor a name");
      }
    }
    auto rg = obj->find(ffi::String("range"));
    if (rg != obj->end()) {
      auto r = (*rg).second.try_cast<ffi::json::Array>();
      if (!r || r->size() != 2 || !(*r)[0].as<int64_t>() || !(*r)[1].as<int64_t>())
        bad("'" + s.name + "' has a 'range' that is not [low, high]");
      s.has_range = true;
      s.low = *(*r)[0].as<int64_t>();
      s.high = *(*r)[1].as<int64_t>();
    }
    out.push_back(s);
  }
  return out;
}

// Parse, validate and verify: every listed file is a regular file with the listed sha256.
static Manifest verify_artifact(const std::string& dir) {
  if (!is_dir(dir)) fail(dir + ": no such artifact directory");
  std::string path = dir + "/manifest.json";
  if (!exists(path)) fail(dir + ": not an fq-tvm artifact (no manifest.json)");
  std::string text = read_regular(path, kMaxManifest);
  ffi::String error;
  ffi::json::Value value = ffi::json::Parse(ffi::String(text), &error);
  if (!error.empty()) fail(path + ": corrupt manifest (" + std::string(error) + ")");
  auto m = value.try_cast<ffi::json::Object>();
  if (!m || str_of(*m, "format") != "fq-tvm-artifact") fail(path + ": not an fq-tvm manifest");
  auto ver = m->find(ffi::String("format_version"));
  if (ver == m->end() || !(*ver).second.as<int64_t>() || *(*ver).second.as<int64_t>() != 1)
    fail(path + ": artifact format version is not 1 (this runner reads version 1)");
  auto files_it = m->find(ffi::String("files"));
  auto files = files_it == m->end() ? std::nullopt : (*files_it).second.try_cast<ffi::json::Object>();
  if (!files || files->empty()) fail(path + ": invalid manifest: 'files' (the sha256 of every file) is missing");
  Manifest out;
  out.library = str_of(*m, "library");
  if (files->find(ffi::String(out.library)) == files->end())
    fail(path + ": invalid manifest: 'library' must name a file listed in 'files'");
  auto target_it = m->find(ffi::String("target"));
  auto target = target_it == m->end() ? std::nullopt : (*target_it).second.try_cast<ffi::json::Object>();
  if (!target) fail(path + ": invalid manifest: 'target' must be an object");
  std::string arch = str_of(*target, "arch"), device = str_of(*target, "device");
  if (device != "cpu") fail(dir + ": built for device '" + device + "'; fq-runner runs CPU artifacts only");
  if (arch != kArch)
    fail(dir + ": built for " + arch + " (target '" + str_of(*target, "name") + "'), this runner is " + kArch);
  out.inputs = specs_of(*m, "inputs", path);
  out.outputs = specs_of(*m, "outputs", path);
  for (const auto& kv : *files) {
    auto name = kv.first.try_cast<ffi::String>();
    auto digest = kv.second.try_cast<ffi::String>();
    if (!name || !plain_name(*name)) fail(path + ": invalid manifest: a file name is not a plain name");
    if (!digest || digest->size() != 64) fail(path + ": invalid manifest: checksum of '" + std::string(*name) +
                                              "' is not a sha256 hex digest");
    std::string file = dir + "/" + std::string(*name);
    if (!exists(file)) fail(dir + ": file '" + std::string(*name) + "' listed in the manifest is missing");
    if (sha256_file(file) != std::string(*digest))
      fail(dir + ": checksum mismatch for '" + std::string(*name) + "' (file changed or corrupt)");
  }
  return out;
}

// ---- .npy / .npz -------------------------------------------------------------------------------

struct NpyArray {
  DLDataType dtype;
  std::vector<int64_t> shape;
  std::string data;
};

static uint16_t le16(const std::string& s, size_t at) {
  return uint16_t(uint8_t(s[at])) | uint16_t(uint8_t(s[at + 1])) << 8;
}
static uint32_t le32(const std::string& s, size_t at) { return le16(s, at) | uint32_t(le16(s, at + 2)) << 16; }
static uint64_t le64(const std::string& s, size_t at) { return le32(s, at) | uint64_t(le32(s, at + 4)) << 32; }

static std::string dict_value(const std::string& header, const std::string& key, const std::string& what) {
  size_t at = header.find("'" + key + "'");
  if (at == std::string::npos) fail(what + ": not a .npy file (no '" + key + "' in its header)");
  at = header.find(':', at);
  if (at == std::string::npos) fail(what + ": not a .npy file (bad header)");
  ++at;
  while (at < header.size() && header[at] == ' ') ++at;
  size_t end;
  if (at < header.size() && header[at] == '(') {
    end = header.find(')', at);
    if (end == std::string::npos) fail(what + ": not a .npy file (bad shape)");
    return header.substr(at + 1, end - at - 1);
  }
  if (at < header.size() && header[at] == '\'') {
    end = header.find('\'', at + 1);
    if (end == std::string::npos) fail(what + ": not a .npy file (bad header)");
    return header.substr(at + 1, end - at - 1);
  }
  end = header.find_first_of(",}", at);
  return header.substr(at, end == std::string::npos ? std::string::npos : end - at);
}

static NpyArray parse_npy(const std::string& bytes, const std::string& what) {
  if (bytes.size() < 10 || bytes.compare(0, 6, "\x93NUMPY") != 0) fail(what + ": not a .npy file");
  int major = uint8_t(bytes[6]);
  size_t header_len, start;
  if (major == 1) {
    header_len = le16(bytes, 8);
    start = 10;
  } else if (major == 2 || major == 3) {
    if (bytes.size() < 12) fail(what + ": not a .npy file");
    header_len = le32(bytes, 8);
    start = 12;
  } else {
    fail(what + ": .npy format version " + std::to_string(major) + " is not supported");
  }
  if (start + header_len > bytes.size()) fail(what + ": truncated .npy file");
  std::string header = bytes.substr(start, header_len);
  std::string descr = dict_value(header, "descr", what);
  if (dict_value(header, "fortran_order", what).find("True") != std::string::npos)
    fail(what + ": Fortran-ordered array; save it with np.save(np.ascontiguousarray(x))");
  if (descr.size() < 3 || (descr[0] != '<' && descr[0] != '|' && descr[0] != '='))
    fail(what + ": dtype '" + descr + "' is not a little-endian number");
  NpyArray out;
  int size = std::atoi(descr.c_str() + 2);
  char kind = descr[1];
  if (kind == 'f') out.dtype = {kDLFloat, uint8_t(size * 8), 1};
  else if (kind == 'i') out.dtype = {kDLInt, uint8_t(size * 8), 1};
  else if (kind == 'u') out.dtype = {kDLUInt, uint8_t(size * 8), 1};
  else if (kind == 'b' && size == 1) out.dtype = {kDLBool, 8, 1};
  else fail(what + ": dtype '" + descr + "' is not supported");
  if (size != 1 && size != 2 && size != 4 && size != 8) fail(what + ": dtype '" + descr + "' is not supported");
  std::string dims = dict_value(header, "shape", what);
  uint64_t count = 1;
  for (size_t at = 0; at < dims.size();) {
    size_t end = dims.find(',', at);
    std::string tok = dims.substr(at, end == std::string::npos ? std::string::npos : end - at);
    tok.erase(std::remove(tok.begin(), tok.end(), ' '), tok.end());
    if (!tok.empty()) {
      char* stop = nullptr;
      long long v = std::strtoll(tok.c_str(), &stop, 10);
      if (*stop != '\0' || v < 0) fail(what + ": bad shape (" + dims + ")");
      out.shape.push_back(v);
      count *= uint64_t(v);
    }
    if (end == std::string::npos) break;
    at = end + 1;
  }
  uint64_t nbytes = count * uint64_t(size);
  if (bytes.size() - start - header_len < nbytes) fail(what + ": truncated .npy file");
  out.data = bytes.substr(start + header_len, nbytes);
  return out;
}

// name -> .npy bytes of every entry of an .npz (a zip archive; stored entries only).
static std::map<std::string, std::string> read_npz(const std::string& path) {
  std::string z = read_regular(path);
  const std::string what = path;
  // End of central directory: the last "PK\5\6" within the final 64 KiB + 22 bytes.
  size_t eocd = std::string::npos;
  for (size_t i = z.size() >= 22 ? z.size() - 22 : 0, stop = i > 65557 ? i - 65557 : 0;; --i) {
    if (z.size() >= 22 && z.compare(i, 4, "PK\x05\x06") == 0) { eocd = i; break; }
    if (i == stop || z.size() < 22) break;
  }
  if (eocd == std::string::npos) fail(what + ": not an .npz file (not a zip archive)");
  uint64_t entries = le16(z, eocd + 10), cd_offset = le32(z, eocd + 16);
  if ((entries == 0xffff || cd_offset == 0xffffffff) && eocd >= 20 && z.compare(eocd - 20, 4, "PK\x06\x07") == 0) {
    uint64_t z64 = le64(z, eocd - 20 + 8);  // zip64 end of central directory record
    if (z64 + 56 > z.size() || z.compare(z64, 4, "PK\x06\x06") != 0) fail(what + ": corrupt zip64 archive");
    entries = le64(z, z64 + 32);
    cd_offset = le64(z, z64 + 48);
  }
  std::map<std::string, std::string> out;
  size_t at = cd_offset;
  for (uint64_t e = 0; e < entries; ++e) {
    if (at + 46 > z.size() || z.compare(at, 4, "PK\x01\x02") != 0) fail(what + ": corrupt zip directory");
    uint16_t method = le16(z, at + 10), name_len = le16(z, at + 28), extra_len = le16(z, at + 30),
             comment_len = le16(z, at + 32);
    uint64_t csize = le32(z, at + 20), usize = le32(z, at + 24), local = le32(z, at + 42);
    if (at + 46 + name_len + extra_len > z.size()) fail(what + ": corrupt zip directory");
    std::string name = z.substr(at + 46, name_len);
    for (size_t x = at + 46 + name_len, end = x + extra_len; x + 4 <= end;) {  // zip64 extra field
      uint16_t id = le16(z, x), len = le16(z, x + 2);
      size_t f = x + 4;
      if (id == 1) {
        if (usize == 0xffffffff && f + 8 <= x + 4 + len) { usize = le64(z, f); f += 8; }
        if (csize == 0xffffffff && f + 8 <= x + 4 + len) { csize = le64(z, f); f += 8; }
        if (local == 0xffffffff && f + 8 <= x + 4 + len) { local = le64(z, f); f += 8; }
      }
      x += 4 + len;
    }
    if (method != 0)
      fail(what + ": entry '" + name + "' is compressed; write the inputs with np.savez (not "
                  "np.savez_compressed) or as .npy files");
    if (local + 30 > z.size() || z.compare(local, 4, "PK\x03\x04") != 0) fail(what + ": corrupt zip entry");
    size_t data = local + 30 + le16(z, local + 26) + le16(z, local + 28);
    if (data + csize > z.size() || csize != usize) fail(what + ": corrupt zip entry '" + name + "'");
    if (ends_with(name, ".npy")) name = name.substr(0, name.size() - 4);
    out[name] = z.substr(data, csize);
    at += 46 + name_len + extra_len + comment_len;
  }
  return out;
}

static void write_npy(const std::string& path, const ffi::Tensor& t) {
  DLDataType dt = t.dtype();
  char kind = dt.code == kDLFloat ? 'f' : dt.code == kDLInt ? 'i' : dt.code == kDLUInt ? 'u' : 'b';
  int size = dt.bits / 8;
  std::string descr = std::string(size == 1 ? "|" : "<") + kind + std::to_string(size);
  std::string dims;
  for (int i = 0; i < t.ndim(); ++i)
    dims += std::to_string(t.size(i)) + (t.ndim() == 1 ? "," : i + 1 < t.ndim() ? ", " : "");
  std::string header = "{'descr': '" + descr + "', 'fortran_order': False, 'shape': (" + dims + "), }";
  size_t total = 10 + header.size() + 1;
  header.append((64 - total % 64) % 64, ' ');
  header += '\n';
  std::string out = std::string("\x93NUMPY\x01\x00", 8);
  out += char(header.size() & 0xff);
  out += char(header.size() >> 8);
  out += header;
  if (t.device().device_type != kDLCPU || !t.IsContiguous()) fail(path + ": the output is not a contiguous CPU tensor");
  out.append(static_cast<const char*>(t.data_ptr()) + t.byte_offset(), ffi::GetDataSize(t.numel(), dt));
  std::string tmp = path + ".tmp";
  FILE* f = std::fopen(tmp.c_str(), "wb");
  if (!f || std::fwrite(out.data(), 1, out.size(), f) != out.size() || std::fclose(f) != 0)
    fail(path + ": cannot write (" + std::strerror(errno) + ")");
  if (std::rename(tmp.c_str(), path.c_str()) != 0) fail(path + ": cannot write (" + std::strerror(errno) + ")");
}

// ---- inputs ------------------------------------------------------------------------------------

static std::string dtype_str(DLDataType t) {
  const char* kind = t.code == kDLFloat ? "float" : t.code == kDLInt ? "int" : t.code == kDLUInt ? "uint" : "bool";
  return t.code == kDLBool ? "bool" : kind + std::to_string(t.bits);
}

static std::string shape_str(const std::vector<int64_t>& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

static std::string spec_shape_str(const Spec& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.shape.size(); ++i) {
    auto v = s.shape[i].as<int64_t>();
    out += (i ? ", " : "") + (v ? std::to_string(*v) : std::string(*s.shape[i].as<ffi::String>()));
  }
  return out + "]";
}

template <typename T>
static void range_of(const std::string& data, int64_t* lo, int64_t* hi) {
  const T* p = reinterpret_cast<const T*>(data.data());
  size_t n = data.size() / sizeof(T);
  for (size_t i = 0; i < n; ++i) {
    int64_t v = static_cast<int64_t>(p[i]);
    *lo = std::min(*lo, v);
    *hi = std::max(*hi, v);
  }
}

static void check_input(const Spec& spec, const NpyArray& a, std::map<std::string, int64_t>* dims) {
  const std::string& n = spec.name;
  if (a.dtype.code != spec.dtype.code || a.dtype.bits != spec.dtype.bits)
    fail("input '" + n + "' has dtype " + dtype_str(a.dtype) + ", expected " + spec.dtype_name);
  bool ok = a.shape.size() == spec.shape.size();
  for (size_t i = 0; ok && i < a.shape.size(); ++i) {
    if (auto v = spec.shape[i].as<int64_t>()) {
      ok = *v == a.shape[i];
    } else {
      std::string name(*spec.shape[i].as<ffi::String>());
      auto it = dims->emplace(name, a.shape[i]).first;
      ok = it->second == a.shape[i];
    }
  }
  if (!ok) fail("input '" + n + "' has shape " + shape_str(a.shape) + ", expected " + spec_shape_str(spec) +
                " (a named dim takes one size across all inputs)");
  if (spec.has_range && !a.data.empty()) {  // indices into a table: the library reads them unchecked
    int64_t lo = INT64_MAX, hi = INT64_MIN;
    if (a.dtype.code == kDLInt && a.dtype.bits == 64) range_of<int64_t>(a.data, &lo, &hi);
    else if (a.dtype.code == kDLInt && a.dtype.bits == 32) range_of<int32_t>(a.data, &lo, &hi);
    else if (a.dtype.code == kDLInt && a.dtype.bits == 16) range_of<int16_t>(a.data, &lo, &hi);
    else if (a.dtype.code == kDLInt && a.dtype.bits == 8) range_of<int8_t>(a.data, &lo, &hi);
    else if (a.dtype.code == kDLUInt && a.dtype.bits == 8) range_of<uint8_t>(a.data, &lo, &hi);
    else if (a.dtype.code == kDLUInt && a.dtype.bits == 16) range_of<uint16_t>(a.data, &lo, &hi);
    else if (a.dtype.code == kDLUInt && a.dtype.bits == 32) range_of<uint32_t>(a.data, &lo, &hi);
    else fail("input '" + n + "' indexes a table but is not an integer array");
    if (lo < spec.low || hi >= spec.high)
      fail("input '" + n + "' has values from " + std::to_string(lo) + " to " + std::to_string(hi) +
           "; it indexes a table of " + std::to_string(spec.high) + " rows, so each must be in [" +
           std::to_string(spec.low) + ", " + std::to_string(spec.high) + ")");
  }
}

static std::map<std::string, NpyArray> gather_inputs(const Manifest& m, const std::string& inputs,
                                                     const std::map<std::string, std::string>& named) {
  std::map<std::string, std::string> raw;  // name -> .npy bytes
  std::map<std::string, std::string> where;
  if (!inputs.empty()) {
    if (is_dir(inputs)) {
      for (const Spec& s : m.inputs) {
        std::string f = inputs + "/" + s.name + ".npy";
        if (exists(f)) { raw[s.name] = read_regular(f); where[s.name] = f; }
      }
    } else if (ends_with(inputs, ".npz")) {
      for (auto& kv : read_npz(inputs)) { where[kv.first] = inputs + ":" + kv.first; raw[kv.first] = kv.second; }
    } else if (ends_with(inputs, ".npy")) {
      if (m.inputs.size() != 1)
        fail(inputs + ": one .npy for a model with " + std::to_string(m.inputs.size()) +
             " inputs; pass NAME=FILE.npy for each, a directory of NAME.npy or an .npz");
      raw[m.inputs[0].name] = read_regular(inputs);
      where[m.inputs[0].name] = inputs;
    } else {
      fail(inputs + ": expected an .npz, a .npy or a directory of NAME.npy files");
    }
  }
  for (const auto& kv : named) { raw[kv.first] = read_regular(kv.second); where[kv.first] = kv.second; }
  std::string names, missing, extra;
  for (const Spec& s : m.inputs) {
    names += (names.empty() ? "" : ", ") + s.name;
    if (!raw.count(s.name)) missing += (missing.empty() ? "" : ", ") + s.name;
  }
  for (const auto& kv : raw) {
    bool known = false;
    for (const Spec& s : m.inputs) known = known || s.name == kv.first;
    if (!known) extra += (extra.empty() ? "" : ", ") + kv.first;
  }
  if (!missing.empty() || !extra.empty())
    fail("inputs do not match the model: missing [" + missing + "], unexpected [" + extra +
         "]; the model takes [" + names + "]");
  std::map<std::string, NpyArray> out;
  std::map<std::string, int64_t> dims;
  for (const Spec& s : m.inputs) {
    out[s.name] = parse_npy(raw[s.name], where[s.name]);
    check_input(s, out[s.name], &dims);
  }
  return out;
}

// Host memory for the inputs, aligned as TVM allocates its own (kAllocAlignment = 64).
struct AlignedAlloc {
  void AllocData(DLTensor* t) {
    size_t n = ffi::GetDataSize(*t);
    t->data = std::aligned_alloc(64, (std::max<size_t>(n, 1) + 63) / 64 * 64);
    if (!t->data) fail("out of memory for an input of " + std::to_string(n) + " bytes");
  }
  void FreeData(DLTensor* t) { std::free(t->data); }
};

// TVM's CPU pool takes half the logical CPUs on x86 (it assumes two hyper-threads per core): on a
// VM with 2 cores and no SMT that is one thread. Like fq_tvm/__init__.py, ask for one thread per
// physical core (distinct "physical id" / "core id" pairs of /proc/cpuinfo) unless TVM_NUM_THREADS
// or OMP_NUM_THREADS is set. On aarch64 TVM's default is already one thread per core.
static void one_thread_per_core() {
#if defined(__x86_64__)
  if (std::getenv("TVM_NUM_THREADS") || std::getenv("OMP_NUM_THREADS")) return;
  FILE* f = std::fopen("/proc/cpuinfo", "r");
  if (!f) return;
  std::vector<std::pair<std::string, std::string>> cores;
  std::string package = "0";
  char line[512];
  while (std::fgets(line, sizeof(line), f)) {
    std::string l(line);
    size_t colon = l.find(':');
    if (colon == std::string::npos) continue;
    std::string key = l.substr(0, l.find_last_not_of(" \t", colon - 1) + 1);
    std::string value = l.substr(colon + 1);
    value.erase(0, value.find_first_not_of(' '));
    value.erase(value.find_last_not_of(" \n") + 1);
    if (key == "physical id") package = value;
    if (key == "core id") cores.emplace_back(package, value);
  }
  std::fclose(f);
  std::sort(cores.begin(), cores.end());
  size_t n = std::unique(cores.begin(), cores.end()) - cores.begin();
  if (n > 0) setenv("TVM_NUM_THREADS", std::to_string(n).c_str(), 0);
#endif
}

// ---- main --------------------------------------------------------------------------------------

static std::vector<ffi::Tensor> as_outputs(const ffi::Any& result) {
  std::vector<ffi::Tensor> out;
  if (auto t = result.try_cast<ffi::Tensor>()) {
    out.push_back(*t);
  } else if (auto arr = result.try_cast<ffi::Array<ffi::Any>>()) {
    for (const ffi::Any& item : *arr) {
      auto t = item.try_cast<ffi::Tensor>();
      if (!t) fail("the model returned a " + item.GetTypeKey() + ", not a tensor");
      out.push_back(*t);
    }
  } else {
    fail("the model returned a " + result.GetTypeKey() + ", not tensors");
  }
  return out;
}

static int64_t parse_count(const char* flag, const char* text, int64_t min) {
  char* stop = nullptr;
  long long v = std::strtoll(text, &stop, 10);
  if (!*text || *stop || v < min) fail(std::string(flag) + " needs an integer >= " + std::to_string(min));
  return v;
}

static std::string last_line(const std::string& text) {
  std::string t = text;
  while (!t.empty() && (t.back() == '\n' || t.back() == ' ')) t.pop_back();
  size_t nl = t.rfind('\n');
  return nl == std::string::npos ? t : t.substr(nl + 1);
}

static int run(int argc, char** argv) {
  std::string model_dir, inputs, out_dir;
  std::map<std::string, std::string> named;
  int64_t repeat = 10, warmup = 2;
  bool check_only = false;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto value = [&]() -> const char* {
      if (i + 1 >= argc) fail(a + " needs a value (fq-runner --help)");
      return argv[++i];
    };
    if (a == "-h" || a == "--help") { std::fputs(kUsage, stdout); return 0; }
    else if (a == "-i" || a == "--inputs") inputs = value();
    else if (a == "-o" || a == "--output") out_dir = value();
    else if (a == "--repeat") repeat = parse_count("--repeat", value(), 1);
    else if (a == "--warmup") warmup = parse_count("--warmup", value(), 0);
    else if (a == "--check") check_only = true;
    else if (!a.empty() && a[0] == '-') fail("unknown option " + a + " (fq-runner --help)");
    else if (model_dir.empty()) model_dir = a;
    else if (a.find('=') != std::string::npos) named[a.substr(0, a.find('='))] = a.substr(a.find('=') + 1);
    else fail("unexpected argument '" + a + "' (inputs are -i FILE or NAME=FILE.npy)");
  }
  if (model_dir.empty()) fail("no model directory given (fq-runner --help)");

  one_thread_per_core();
  Manifest m = verify_artifact(model_dir);
  if (check_only) {
    std::printf("fq-runner: %s verified (%s)\n", model_dir.c_str(), kArch);
    return 0;
  }
  std::map<std::string, NpyArray> arrays = gather_inputs(m, inputs, named);

  ffi::Optional<ffi::Function> init, main_fn;
  try {
    ffi::Module lib = ffi::Module::LoadFromFile(model_dir + "/" + m.library);
    auto load = lib->GetFunction(ffi::String("vm_load_executable"), true);
    if (!load) fail(model_dir + ": cannot load '" + m.library + "': not a Relax VM executable");
    ffi::Module vm = (*load)().cast<ffi::Module>();
    init = vm->GetFunction(ffi::String("vm_initialization"), false);
    main_fn = vm->GetFunction(ffi::String("main"), false);
    if (!init || !main_fn) fail(model_dir + ": cannot load '" + m.library + "': the VM executable has no main");
  } catch (const ffi::Error& e) {
    fail(model_dir + ": cannot load '" + m.library + "': " + last_line(e.message()));
  }
  (*init)(static_cast<int>(kDLCPU), 0, 2);  // CPU device 0, pooled allocator (VirtualMachine's default)

  DLDevice cpu{kDLCPU, 0};
  std::vector<ffi::Tensor> args;
  for (const Spec& s : m.inputs) {
    const NpyArray& a = arrays[s.name];
    ffi::Tensor t = ffi::Tensor::FromNDAlloc(AlignedAlloc(), ffi::Shape(a.shape.begin(), a.shape.end()), a.dtype, cpu);
    if (!a.data.empty()) std::memcpy(t.data_ptr(), a.data.data(), a.data.size());
    args.push_back(t);
  }
  std::vector<ffi::AnyView> views(args.begin(), args.end());
  auto call = [&]() {
    ffi::Any result;
    (*main_fn).CallPacked(views.data(), static_cast<int32_t>(views.size()), &result);
    return result;
  };
  ffi::Any result = call();
  for (int64_t i = 1; i < warmup; ++i) call();
  std::vector<double> ms;
  for (int64_t i = 0; i < repeat; ++i) {
    auto t0 = std::chrono::steady_clock::now();
    ffi::Any r = call();
    auto t1 = std::chrono::steady_clock::now();
    ms.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
  }
  std::vector<ffi::Tensor> outs = as_outputs(result);
  if (outs.size() != m.outputs.size())
    fail(model_dir + ": the library returned " + std::to_string(outs.size()) + " outputs, the manifest lists " +
         std::to_string(m.outputs.size()));
  if (!out_dir.empty()) {
    if (!is_dir(out_dir) && mkdir(out_dir.c_str(), 0777) != 0)
      fail(out_dir + ": cannot create the output directory (" + std::strerror(errno) + ")");
    for (size_t i = 0; i < outs.size(); ++i) {
      std::string path = out_dir + "/" + m.outputs[i].name + ".npy";
      write_npy(path, outs[i]);
      std::printf("%s\n", path.c_str());
    }
  }
  std::vector<double> sorted = ms;
  std::sort(sorted.begin(), sorted.end());
  size_t n = sorted.size();
  double median = n % 2 ? sorted[n / 2] : 0.5 * (sorted[n / 2 - 1] + sorted[n / 2]);
  std::fprintf(stderr, "fq-runner: latency median %.3f ms, min %.3f ms, max %.3f ms over %lld runs (%lld warm-up)\n",
               median, sorted.front(), sorted.back(), static_cast<long long>(n),
               static_cast<long long>(std::max<int64_t>(warmup, 1)));
  return 0;
}

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const Fail& e) {
    std::fprintf(stderr, "fq-runner: %s\n", e.what());
  } catch (const ffi::Error& e) {
    std::fprintf(stderr, "fq-runner: %s: %s\n", e.kind().c_str(), last_line(e.message()).c_str());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "fq-runner: %s\n", last_line(e.what()).c_str());
  }
  return 1;
}
