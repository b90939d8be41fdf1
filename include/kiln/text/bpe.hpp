// kiln/text/bpe.hpp — GPT-2-style byte-level BPE: encode, decode, and Hugging Face
// tokenizer.json in and out (learning the merges from a corpus: kiln/text/bpe_trainer.hpp).
//
// Spec:
//   Encoding. Text is first cut at special tokens, then at the other added tokens (both
//   leftmost-longest, never split — Hugging Face's order). Each remaining piece gets a
//   leading ' ' when add_prefix_space is on and it does not start with one, and is cut into
//   words by GPT-2's pre-tokenizer (kiln/text/unicode.hpp: the regex hand-written;
//   \p{L}/\p{N}/\s decided by a table generated from Unicode 14; bytes that are not valid
//   UTF-8 count as one "other" character each). Each word starts as one token per byte and
//   merges are applied lowest rank first, leftmost first among equal ranks (what the
//   `tokenizers` package does). Results are cached per word (a bounded, mutex-guarded cache:
//   encode() may be called from several threads).
//   Any byte string encodes — valid UTF-8 or not — and decode(encode(s)) == s whenever the
//   vocabulary has all 256 byte tokens (every trained tokenizer does). A loaded vocabulary
//   missing a byte maps it to unk_token when one is set, else encode() throws naming the
//   byte and its offset (the `tokenizers` package would silently drop it).
//   decode(ids) concatenates the tokens' bytes; added tokens give their content (or nothing
//   with skip_special, for special ones). Unknown ids are errors naming the id and position.
//
//   tokenizer.json (load/save). Supported — and nothing else, refused with kiln::error
//   naming the file, the field, what was found and what was expected:
//     model: type "BPE", vocab (string → id), merges as "a b" strings or [a, b] pairs,
//       dropout null, continuing_subword_prefix / end_of_word_suffix null or "",
//       byte_fallback false, unk_token null or a vocab token, fuse_unk, ignore_merges;
//       ids must be >= 0 and below 2 × (#vocab + #added) + 256 (dense enough to index);
//     pre_tokenizer: ByteLevel (add_prefix_space, trim_offsets, use_regex), alone or as
//       the only member of a Sequence;
//     normalizer null (or an empty Sequence); post_processor null or ByteLevel; decoder
//       null or ByteLevel; truncation and padding null;
//     added_tokens: {id, content, special, normalized, single_word=false, lstrip=false,
//       rstrip=false}; an added token whose id is in model.vocab must have that spelling.
//   Vocab keys are spelled in the byte alphabet; a key character outside it (only in
//   hand-made files) stands for its own UTF-8 bytes. save() writes the fields above with
//   merges as "a b" strings (readable by every `tokenizers` version), or [a, b] pairs when
//   asked or when a token contains ' '; the package loads it and gives the same ids.
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <mutex>
#include <queue>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "kiln/core/error.hpp"
#include "kiln/io/atomic_file.hpp"
#include "kiln/io/json.hpp"
#include "kiln/text/added_tokens.hpp"
#include "kiln/text/byte_tokenizer.hpp"
#include "kiln/text/unicode.hpp"

namespace kiln::text {

namespace detail {
// A merge's pair of token ids as one hash key; ordered by the left id, then the right.
inline std::uint64_t bpe_pair_key(std::int32_t a, std::int32_t b) {
  return (static_cast<std::uint64_t>(static_cast<std::uint32_t>(a)) << 32) | static_cast<std::uint32_t>(b);
}
}  // namespace detail

enum class merges_spelling { strings, pairs };

class bpe_tokenizer {
 public:
  // 256 byte tokens, no merges (encodes one token per byte).
  bpe_tokenizer() {
    for (int k = 0; k < 256; ++k) add_model_token(std::string(1, static_cast<char>(byte_of_rank()[k])));
    index_bytes();
  }

  // ---- encoding ----
  std::vector<std::int32_t> encode(std::string_view text) const {
    std::vector<std::int32_t> out;
    out.reserve(text.size() / 3 + 4);
    special_.split(
        text, [&](std::string_view piece) { encode_added(piece, text, out); },
        [&](std::int32_t id) { out.push_back(id); });
    return out;
  }
  // Treats special tokens' contents as ordinary text.
  std::vector<std::int32_t> encode_ordinary(std::string_view text) const {
    std::vector<std::int32_t> out;
    encode_piece(text, text, out);
    return out;
  }
  std::string decode(std::span<const std::int32_t> ids, bool skip_special = false) const {
    std::string out;
    for (std::size_t k = 0; k < ids.size(); ++k) {
      const std::int32_t id = ids[k];
      KILN_CHECK(id >= 0 && id < vocab_size() && tok_[static_cast<std::size_t>(id)].present,
                 "bpe_tokenizer.decode: id ", id, " at position ", k, " is not in the vocabulary (",
                 id >= 0 && id < vocab_size() ? "a gap in the ids" : "size " + std::to_string(vocab_size()), ")");
      const token& t = tok_[static_cast<std::size_t>(id)];
      if (skip_special && t.special) continue;
      out += t.bytes;
    }
    return out;
  }

  // ---- inspection ----
  std::int32_t vocab_size() const { return static_cast<std::int32_t>(tok_.size()); }  // max id + 1
  std::size_t num_merges() const { return merges_.size(); }
  // Merge k (rank k) as the token ids it joins.
  std::pair<std::int32_t, std::int32_t> merge(std::size_t k) const { return merges_.at(k); }
  // The bytes of a token (an added token's content).
  const std::string& token_bytes(std::int32_t id) const {
    KILN_CHECK(id >= 0 && id < vocab_size() && tok_[static_cast<std::size_t>(id)].present, "bpe_tokenizer: id ", id,
               " is not in the vocabulary");
    return tok_[static_cast<std::size_t>(id)].bytes;
  }
  // The id of a model token with these bytes or of an added token with this content, or -1.
  std::int32_t token_to_id(std::string_view bytes) const {
    for (auto& [c, id] : special_.tokens())
      if (c == bytes) return id;
    for (auto& [c, id] : added_.tokens())
      if (c == bytes) return id;
    auto it = model_id_of_bytes_.find(std::string(bytes));
    return it == model_id_of_bytes_.end() ? -1 : it->second;
  }
  bool is_special(std::int32_t id) const {
    return id >= 0 && id < vocab_size() && tok_[static_cast<std::size_t>(id)].special;
  }
  bool add_prefix_space() const { return add_prefix_space_; }
  // Appends a special token (id = vocab_size()) unless its content is already one; returns its id.
  std::int32_t add_special_token(std::string content) {
    if (const std::int32_t id = token_to_id(content); id >= 0 && is_special(id)) return id;
    KILN_CHECK(spelling_to_id_.count(content) == 0, "bpe_tokenizer.add_special_token: \"", content,
               "\" is already spelled by a vocabulary token");
    const auto id = vocab_size();
    tok_.push_back({content, content, true, true, true, true, false});
    spelling_to_id_.emplace(content, id);
    special_.add(content, id);
    return id;
  }
  // Appends the merge of model tokens a and b, applied after every existing merge. The
  // merged token is the model token with a's bytes then b's, given the next id when there
  // is none yet; returns its id. (kiln/text/bpe_trainer.hpp builds tokenizers this way.)
  std::int32_t add_merge(std::int32_t a, std::int32_t b) {
    for (const std::int32_t id : {a, b})
      KILN_CHECK(id >= 0 && id < vocab_size() && tok_[static_cast<std::size_t>(id)].in_model,
                 "bpe_tokenizer.add_merge: id ", id, " is not a token of the model's vocabulary");
    std::string bytes = tok_[static_cast<std::size_t>(a)].bytes + tok_[static_cast<std::size_t>(b)].bytes;
    auto existing = model_id_of_bytes_.find(bytes);
    std::int32_t z = -1;
    if (existing != model_id_of_bytes_.end()) {
      z = existing->second;
    } else {
      KILN_CHECK(spelling_to_id_.count(spell(bytes)) == 0, "bpe_tokenizer.add_merge: the merged token \"", bytes,
                 "\" is already spelled by an added token");
      z = add_model_token(std::move(bytes));
    }
    record_merge(a, b, z);
    std::lock_guard lk(cache_.p->mu);  // words encoded before may now merge further
    cache_.p->map.clear();
    return z;
  }
  // Sets add_prefix_space(): whether encode() puts a ' ' before a piece of text that does
  // not start with one.
  void set_add_prefix_space(bool on) { add_prefix_space_ = on; }

  // ---- tokenizer.json ----
  static bpe_tokenizer load(const std::filesystem::path& path) {
    return from_json(detail::read_whole_file(path), path.string());
  }
  static bpe_tokenizer from_json(std::string_view text, std::string_view what = "tokenizer.json");
  io::json to_json(merges_spelling spelling = merges_spelling::strings) const;
  void save(const std::filesystem::path& path, merges_spelling spelling = merges_spelling::strings) const {
    io::write_atomically(path, to_json(spelling).dump() + "\n");
  }

  // The tokenizer.json spelling of bytes (GPT-2's alphabet: ' ' is "Ġ").
  static std::string spell(std::string_view bytes) {
    std::string s;
    for (unsigned char c : bytes) append_utf8(byte_to_unicode(c), s);
    return s;
  }
  // The bytes a tokenizer.json spelling stands for (characters outside the alphabet stand
  // for their own UTF-8 bytes).
  static std::string unspell(std::string_view s) {
    std::string b;
    for (std::size_t i = 0; i < s.size();) {
      const utf8_unit u = decode_utf8_at(s, i);
      const int byte = u.valid ? unicode_to_byte(u.cp) : -1;
      if (byte >= 0)
        b += static_cast<char>(byte);
      else
        b.append(s.substr(i, static_cast<std::size_t>(u.len)));
      i += static_cast<std::size_t>(u.len);
    }
    return b;
  }

 private:
  struct token {
    std::string bytes;
    std::string spelling;  // the tokenizer.json key
    bool present = false;
    bool in_model = false;  // in model.vocab (else only in added_tokens)
    bool added = false;
    bool special = false;
    bool normalized = false;
  };
  struct merge_info {
    std::int32_t rank, result;
  };
  struct word_cache {
    std::mutex mu;
    std::unordered_map<std::string, std::vector<std::int32_t>> map;
  };
  // Each copy gets its own (empty) cache: the mutex cannot be copied, and the merges are
  // fixed after construction, so nothing is lost.
  struct cache_slot {
    std::unique_ptr<word_cache> p = std::make_unique<word_cache>();
    cache_slot() = default;
    cache_slot(const cache_slot&) : p(std::make_unique<word_cache>()) {}
    cache_slot& operator=(const cache_slot&) {
      p = std::make_unique<word_cache>();
      return *this;
    }
    cache_slot(cache_slot&&) noexcept = default;
    cache_slot& operator=(cache_slot&&) noexcept = default;
  };
  static constexpr std::size_t cache_capacity = 1 << 16;
  static constexpr std::size_t cache_max_word = 64;

  // Byte values in order of their alphabet code points: rank k -> byte.
  static const std::array<std::uint8_t, 256>& byte_of_rank() {
    static const std::array<std::uint8_t, 256> r = [] {
      std::array<std::uint8_t, 256> a{};
      for (int b = 0; b < 256; ++b) a[static_cast<std::size_t>(b)] = static_cast<std::uint8_t>(b);
      std::sort(a.begin(), a.end(),
                [](std::uint8_t x, std::uint8_t y) { return byte_to_unicode(x) < byte_to_unicode(y); });
      return a;
    }();
    return r;
  }

  std::int32_t add_model_token(std::string bytes) {
    const auto id = vocab_size();
    std::string sp = spell(bytes);
    tok_.push_back({bytes, sp, true, true, false, false, false});
    spelling_to_id_.emplace(std::move(sp), id);
    model_id_of_bytes_.emplace(std::move(bytes), id);
    return id;
  }
  void index_bytes() {
    byte_id_.fill(-1);
    for (int b = 0; b < 256; ++b) {
      auto it = spelling_to_id_.find(spell(std::string(1, static_cast<char>(b))));
      if (it != spelling_to_id_.end() && tok_[static_cast<std::size_t>(it->second)].in_model &&
          !tok_[static_cast<std::size_t>(it->second)].added)
        byte_id_[static_cast<std::size_t>(b)] = it->second;
    }
  }
  void record_merge(std::int32_t a, std::int32_t b, std::int32_t result) {
    const auto rank = static_cast<std::int32_t>(merges_.size());
    merges_.emplace_back(a, b);
    // A repeated pair keeps its last rank, as `tokenizers` does.
    merge_of_[detail::bpe_pair_key(a, b)] = {rank, result};
  }

  void encode_added(std::string_view piece, std::string_view whole, std::vector<std::int32_t>& out) const {
    if (added_.empty()) return encode_piece(piece, whole, out);
    added_.split(
        piece, [&](std::string_view p) { encode_piece(p, whole, out); }, [&](std::int32_t id) { out.push_back(id); });
  }
  void encode_piece(std::string_view piece, std::string_view whole, std::vector<std::int32_t>& out) const {
    if (piece.empty()) return;
    std::string prefixed;
    std::size_t base = static_cast<std::size_t>(piece.data() - whole.data());
    std::size_t shift = 0;
    if (add_prefix_space_ && piece[0] != ' ') {
      prefixed.reserve(piece.size() + 1);
      prefixed += ' ';
      prefixed += piece;
      piece = prefixed;
      shift = 1;
    }
    if (!use_regex_) return encode_word(piece, base - shift, out);
    gpt2_pretokenize(piece,
                     [&](std::size_t b, std::size_t e) { encode_word(piece.substr(b, e - b), base + b - shift, out); });
  }
  void encode_word(std::string_view word, std::size_t offset, std::vector<std::int32_t>& out) const {
    const bool cacheable = word.size() <= cache_max_word;
    if (cacheable) {
      std::lock_guard lk(cache_.p->mu);
      auto it = cache_.p->map.find(std::string(word));
      if (it != cache_.p->map.end()) {
        out.insert(out.end(), it->second.begin(), it->second.end());
        return;
      }
    }
    std::vector<std::int32_t> ids = bpe_word(word, offset);
    out.insert(out.end(), ids.begin(), ids.end());
    if (cacheable) {
      std::lock_guard lk(cache_.p->mu);
      if (cache_.p->map.size() >= cache_capacity) cache_.p->map.clear();
      cache_.p->map.emplace(std::string(word), std::move(ids));
    }
  }
  // One word: bytes to tokens, then the merges, lowest rank (then leftmost) first.
  std::vector<std::int32_t> bpe_word(std::string_view word, std::size_t offset) const {
    if (ignore_merges_) {
      auto it = model_id_of_bytes_.find(std::string(word));
      if (it != model_id_of_bytes_.end()) return {it->second};
    }
    std::vector<std::int32_t> id;
    id.reserve(word.size());
    bool last_unk = false;
    for (std::size_t i = 0; i < word.size(); ++i) {
      const auto c = static_cast<unsigned char>(word[i]);
      const std::int32_t t = byte_id_[c];
      if (t >= 0) {
        id.push_back(t);
        last_unk = false;
        continue;
      }
      KILN_CHECK(unk_id_ >= 0, "bpe_tokenizer.encode: byte ", detail::describe_byte(c), " at offset ", offset + i,
                 " has no token in this vocabulary and no unk_token is set");
      if (!(fuse_unk_ && last_unk)) id.push_back(unk_id_);
      last_unk = true;
    }
    const std::size_t n = id.size();
    if (n < 2 || merge_of_.empty()) return id;
    std::vector<std::int32_t> next(n), prev(n);
    for (std::size_t i = 0; i < n; ++i) {
      next[i] = i + 1 < n ? static_cast<std::int32_t>(i + 1) : -1;
      prev[i] = static_cast<std::int32_t>(i) - 1;
    }
    std::vector<char> alive(n, 1);
    using item = std::pair<std::int32_t, std::int32_t>;  // (rank, position)
    std::priority_queue<item, std::vector<item>, std::greater<item>> heap;
    const auto consider = [&](std::int32_t pos) {
      const std::int32_t nx = next[static_cast<std::size_t>(pos)];
      if (pos < 0 || nx < 0) return;
      auto it =
          merge_of_.find(detail::bpe_pair_key(id[static_cast<std::size_t>(pos)], id[static_cast<std::size_t>(nx)]));
      if (it != merge_of_.end()) heap.emplace(it->second.rank, pos);
    };
    for (std::size_t i = 0; i + 1 < n; ++i) consider(static_cast<std::int32_t>(i));
    while (!heap.empty()) {
      const auto [rank, pos] = heap.top();
      heap.pop();
      const auto p = static_cast<std::size_t>(pos);
      if (!alive[p] || next[p] < 0) continue;
      const auto nx = static_cast<std::size_t>(next[p]);
      auto it = merge_of_.find(detail::bpe_pair_key(id[p], id[nx]));
      if (it == merge_of_.end() || it->second.rank != rank) continue;  // stale: the pair changed
      id[p] = it->second.result;
      alive[nx] = 0;
      next[p] = next[nx];
      if (next[p] >= 0) prev[static_cast<std::size_t>(next[p])] = pos;
      if (prev[p] >= 0) consider(prev[p]);
      consider(pos);
    }
    std::vector<std::int32_t> out;
    for (std::int32_t i = 0; i >= 0; i = next[static_cast<std::size_t>(i)])
      out.push_back(id[static_cast<std::size_t>(i)]);
    return out;
  }

  std::vector<token> tok_;
  std::unordered_map<std::string, std::int32_t> spelling_to_id_;     // tokenizer.json keys
  std::unordered_map<std::string, std::int32_t> model_id_of_bytes_;  // model tokens by bytes
  std::array<std::int32_t, 256> byte_id_{};
  std::vector<std::pair<std::int32_t, std::int32_t>> merges_;
  std::unordered_map<std::uint64_t, merge_info> merge_of_;
  added_token_matcher special_, added_;
  bool add_prefix_space_ = false, use_regex_ = true, trim_offsets_ = true;
  bool ignore_merges_ = false, fuse_unk_ = false;
  std::int32_t unk_id_ = -1;
  mutable cache_slot cache_;
};

// ---------------------------------------------------------------------------------------
// tokenizer.json

inline io::json bpe_tokenizer::to_json(merges_spelling spelling) const {
  using obj = io::json::object_type;
  using arr = io::json::array_type;
  if (spelling == merges_spelling::strings)
    for (auto& [a, b] : merges_)
      if (tok_[static_cast<std::size_t>(a)].spelling.find(' ') != std::string::npos ||
          tok_[static_cast<std::size_t>(b)].spelling.find(' ') != std::string::npos)
        spelling = merges_spelling::pairs;  // "a b" would be ambiguous
  arr added;
  for (std::size_t id = 0; id < tok_.size(); ++id) {
    const token& t = tok_[id];
    if (!t.added) continue;
    added.push_back(io::json(obj{{"id", io::json(static_cast<std::int64_t>(id))},
                                 {"content", io::json(t.bytes)},
                                 {"single_word", false},
                                 {"lstrip", false},
                                 {"rstrip", false},
                                 {"normalized", t.normalized},
                                 {"special", t.special}}));
  }
  obj vocab;
  vocab.reserve(tok_.size());
  for (std::size_t id = 0; id < tok_.size(); ++id)
    if (tok_[id].present && tok_[id].in_model)
      vocab.emplace_back(tok_[id].spelling, io::json(static_cast<std::int64_t>(id)));
  arr merges;
  merges.reserve(merges_.size());
  for (auto& [a, b] : merges_) {
    const std::string& sa = tok_[static_cast<std::size_t>(a)].spelling;
    const std::string& sb = tok_[static_cast<std::size_t>(b)].spelling;
    if (spelling == merges_spelling::strings)
      merges.push_back(io::json(sa + " " + sb));
    else
      merges.push_back(io::json(arr{io::json(sa), io::json(sb)}));
  }
  const auto byte_level = [](bool prefix, bool trim) {
    return io::json(
        obj{{"type", "ByteLevel"}, {"add_prefix_space", prefix}, {"trim_offsets", trim}, {"use_regex", true}});
  };
  io::json pre = byte_level(add_prefix_space_, trim_offsets_);
  if (!use_regex_) pre.set("use_regex", false);
  const io::json unk = unk_id_ >= 0 ? io::json(tok_[static_cast<std::size_t>(unk_id_)].spelling) : io::json();
  io::json model(obj{{"type", "BPE"},
                     {"dropout", io::json()},
                     {"unk_token", unk},
                     {"continuing_subword_prefix", io::json()},
                     {"end_of_word_suffix", io::json()},
                     {"fuse_unk", fuse_unk_},
                     {"byte_fallback", false},
                     {"ignore_merges", ignore_merges_},
                     {"vocab", io::json(std::move(vocab))},
                     {"merges", io::json(std::move(merges))}});
  return io::json(obj{{"version", "1.0"},
                      {"truncation", io::json()},
                      {"padding", io::json()},
                      {"added_tokens", io::json(std::move(added))},
                      {"normalizer", io::json()},
                      {"pre_tokenizer", pre},
                      {"post_processor", io::json()},
                      {"decoder", byte_level(true, true)},
                      {"model", std::move(model)}});
}

namespace detail {
// Reads tokenizer.json fields, naming the file and the field in every error.
struct tj_reader {
  std::string file;
  [[noreturn]] void fail(std::string_view field, std::string_view expected, const io::json* got) const {
    kiln::detail::fail(file, ": field \"", field, "\": expected ", expected, ", got ",
                       got ? got->describe() : std::string("nothing (the field is missing)"));
  }
  const io::json& need(const io::json& parent, std::string_view name, std::string_view field, io::json::kind k,
                       std::string_view expected) const {
    const io::json* v = parent.find(name);
    if (!v || v->type() != k) fail(field, expected, v);
    return *v;
  }
  bool flag(const io::json& parent, std::string_view name, std::string_view field, bool def) const {
    const io::json* v = parent.find(name);
    if (!v || v->is_null()) return def;
    if (!v->is_bool()) fail(field, "true or false", v);
    return v->as_bool();
  }
  void must_be_null(const io::json& parent, std::string_view name, std::string_view field, std::string_view why) const {
    const io::json* v = parent.find(name);
    if (v && !v->is_null()) fail(field, std::string("null (") + std::string(why) + ")", v);
  }
  std::string type_of(const io::json& v) const {
    const io::json* t = v.find("type");
    return t && t->is_string() ? t->as_string() : std::string();
  }
  // A ByteLevel pre-tokenizer: (add_prefix_space, trim_offsets, use_regex).
  std::array<bool, 3> byte_level(const io::json& p, std::string_view field) const {
    if (!p.is_object() || type_of(p) != "ByteLevel")
      fail(std::string(field) + ".type", "\"ByteLevel\" (kiln supports byte-level BPE only)",
           p.is_object() ? p.find("type") : &p);
    return {flag(p, "add_prefix_space", std::string(field) + ".add_prefix_space", true),
            flag(p, "trim_offsets", std::string(field) + ".trim_offsets", true),
            flag(p, "use_regex", std::string(field) + ".use_regex", true)};
  }
};
}  // namespace detail

inline bpe_tokenizer bpe_tokenizer::from_json(std::string_view text, std::string_view what) {
  using K = io::json::kind;
  const detail::tj_reader r{std::string(what)};
  const io::json j = io::json::parse(text, what);
  if (!j.is_object()) r.fail("(top level)", "a JSON object", &j);

  // Everything around the model must leave the text and the ids alone.
  if (const io::json* n = j.find("normalizer"); n && !n->is_null()) {
    const io::json* list = n->find("normalizers");
    if (!(r.type_of(*n) == "Sequence" && list && list->is_array() && list->size() == 0))
      r.fail("normalizer", "null (kiln applies no normalizer; one would change the text before BPE)", n);
  }
  r.must_be_null(j, "truncation", "truncation", "kiln does not truncate");
  r.must_be_null(j, "padding", "padding", "kiln does not pad");
  if (const io::json* p = j.find("post_processor"); p && !p->is_null() && r.type_of(*p) != "ByteLevel")
    r.fail("post_processor.type", "null or \"ByteLevel\" (other post-processors add tokens)", p->find("type"));
  if (const io::json* d = j.find("decoder"); d && !d->is_null() && r.type_of(*d) != "ByteLevel")
    r.fail("decoder.type", "null or \"ByteLevel\"", d->find("type"));

  bpe_tokenizer t;
  t.tok_.clear();
  t.spelling_to_id_.clear();
  t.model_id_of_bytes_.clear();

  const io::json* pre = j.find("pre_tokenizer");
  if (!pre || pre->is_null()) r.fail("pre_tokenizer", "a ByteLevel pre-tokenizer", pre);
  std::array<bool, 3> bl{};
  if (r.type_of(*pre) == "Sequence") {
    const io::json& list = r.need(*pre, "pretokenizers", "pre_tokenizer.pretokenizers", K::array,
                                  "an array holding one ByteLevel pre-tokenizer");
    if (list.size() != 1) r.fail("pre_tokenizer.pretokenizers", "exactly one member, a ByteLevel pre-tokenizer", &list);
    bl = r.byte_level(list.as_array()[0], "pre_tokenizer.pretokenizers[0]");
  } else {
    bl = r.byte_level(*pre, "pre_tokenizer");
  }
  t.add_prefix_space_ = bl[0];
  t.trim_offsets_ = bl[1];
  t.use_regex_ = bl[2];

  const io::json& model = r.need(j, "model", "model", K::object, "an object (the model, with \"type\": \"BPE\")");
  if (const io::json* ty = model.find("type"); !ty || !ty->is_string() || ty->as_string() != "BPE")
    r.fail("model.type", "\"BPE\" (kiln reads byte-level BPE models only)", ty);
  if (const io::json* d = model.find("dropout"); d && !d->is_null() && !(d->is_number() && d->as_double() == 0.0))
    r.fail("model.dropout", "null (BPE dropout is not supported)", d);
  for (const char* f : {"continuing_subword_prefix", "end_of_word_suffix"})
    if (const io::json* v = model.find(f); v && !v->is_null() && !(v->is_string() && v->as_string().empty()))
      r.fail(std::string("model.") + f, "null (not used by byte-level BPE)", v);
  if (r.flag(model, "byte_fallback", "model.byte_fallback", false))
    r.fail("model.byte_fallback", "false (byte fallback is for non-byte-level models)", model.find("byte_fallback"));
  t.fuse_unk_ = r.flag(model, "fuse_unk", "model.fuse_unk", false);
  t.ignore_merges_ = r.flag(model, "ignore_merges", "model.ignore_merges", false);

  const io::json& vocab = r.need(model, "vocab", "model.vocab", K::object, "an object of token -> id");
  const io::json* added = j.find("added_tokens");
  if (added && !added->is_null() && !added->is_array()) r.fail("added_tokens", "an array", added);
  const std::size_t n_added = added && added->is_array() ? added->size() : 0;
  const std::int64_t id_limit = 2 * static_cast<std::int64_t>(vocab.size() + n_added) + 256;
  const auto check_id = [&](const io::json& v, const std::string& field) {
    if (!v.is_integer() || v.as_int() < 0 || v.as_int() >= id_limit)
      r.fail(field, "an integer id in [0, " + std::to_string(id_limit) + ") (ids must be dense)", &v);
    const auto id = static_cast<std::size_t>(v.as_int());
    if (id >= t.tok_.size()) t.tok_.resize(id + 1);
    return static_cast<std::int32_t>(id);
  };
  for (auto& [k, v] : vocab.as_object()) {
    const std::string field = "model.vocab[\"" + k.substr(0, 40) + "\"]";
    const std::int32_t id = check_id(v, field);
    token& tk = t.tok_[static_cast<std::size_t>(id)];
    if (tk.present)
      r.fail(field, "an id no other token has (id " + std::to_string(id) + " is also \"" + tk.spelling + "\")", &v);
    tk = {unspell(k), k, true, true, false, false, false};
    t.spelling_to_id_.emplace(k, id);
    t.model_id_of_bytes_.emplace(tk.bytes, id);
  }
  for (std::size_t k = 0; k < n_added; ++k) {
    const io::json& a = added->as_array()[k];
    const std::string field = "added_tokens[" + std::to_string(k) + "]";
    if (!a.is_object()) r.fail(field, "an object {id, content, special, ...}", &a);
    const std::int32_t id = check_id(r.need(a, "id", field + ".id", K::integer, "an integer id"), field + ".id");
    const std::string& content = r.need(a, "content", field + ".content", K::string, "a string").as_string();
    if (content.empty()) r.fail(field + ".content", "a non-empty string", a.find("content"));
    for (const char* f : {"single_word", "lstrip", "rstrip"})
      if (r.flag(a, f, field + "." + f, false))
        r.fail(field + "." + f, "false (kiln matches added tokens exactly as written)", a.find(f));
    const bool special = r.flag(a, "special", field + ".special", false);
    token& tk = t.tok_[static_cast<std::size_t>(id)];
    if (tk.present && tk.spelling != content)
      r.fail(field + ".id", "the id of \"" + content + "\", but model.vocab gives this id to \"" + tk.spelling + "\"",
             a.find("id"));
    if (auto it = t.spelling_to_id_.find(content); it != t.spelling_to_id_.end() && it->second != id)
      r.fail(field + ".id", std::to_string(it->second) + ", the id model.vocab gives \"" + content + "\"",
             a.find("id"));
    if (tk.added) r.fail(field + ".id", "an id not used by another added token", a.find("id"));
    const bool in_model = tk.present;
    tk = {content, content, true, in_model, true, special, r.flag(a, "normalized", field + ".normalized", !special)};
    t.spelling_to_id_.emplace(content, id);
    (special ? t.special_ : t.added_).add(content, id);
  }
  // Model tokens spelled like an added token are that added token (its bytes are the content).
  for (auto& tk : t.tok_)
    if (tk.present && tk.in_model && tk.added) t.model_id_of_bytes_.erase(unspell(tk.spelling));

  if (const io::json* unk = model.find("unk_token"); unk && !unk->is_null()) {
    if (!unk->is_string()) r.fail("model.unk_token", "null or a token of model.vocab", unk);
    auto it = t.spelling_to_id_.find(unk->as_string());
    if (it == t.spelling_to_id_.end()) r.fail("model.unk_token", "null or a token of model.vocab", unk);
    t.unk_id_ = it->second;
  }

  const io::json& merges =
      r.need(model, "merges", "model.merges", K::array, "an array of merges, each \"a b\" or [\"a\", \"b\"]");
  const auto id_of = [&](const std::string& s, const std::string& field, const io::json& e) {
    auto it = t.spelling_to_id_.find(s);
    if (it == t.spelling_to_id_.end() || !t.tok_[static_cast<std::size_t>(it->second)].in_model)
      r.fail(field, "tokens of model.vocab (\"" + s.substr(0, 40) + "\" is not one)", &e);
    return it->second;
  };
  for (std::size_t k = 0; k < merges.size(); ++k) {
    const io::json& e = merges.as_array()[k];
    const std::string field = "model.merges[" + std::to_string(k) + "]";
    std::string a, b;
    if (e.is_string()) {
      const std::string& s = e.as_string();
      const auto sp = s.find(' ');
      if (sp == std::string::npos || s.find(' ', sp + 1) != std::string::npos)
        r.fail(field, "\"a b\": two tokens separated by one space", &e);
      a = s.substr(0, sp);
      b = s.substr(sp + 1);
    } else if (e.is_array() && e.size() == 2 && e.as_array()[0].is_string() && e.as_array()[1].is_string()) {
      a = e.as_array()[0].as_string();
      b = e.as_array()[1].as_string();
    } else {
      r.fail(field, "\"a b\" or [\"a\", \"b\"]", &e);
    }
    const std::int32_t ia = id_of(a, field, e), ib = id_of(b, field, e);
    const std::int32_t z = id_of(a + b, field + " (the merged token)", e);
    t.record_merge(ia, ib, z);
  }
  t.index_bytes();
  return t;
}

}  // namespace kiln::text
