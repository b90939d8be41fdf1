// kiln/text/added_tokens.hpp — finding special (added) tokens such as <|endoftext|> in text.
//
// Spec: added_token_matcher holds (content, id) pairs. split(text, on_text, on_token) walks
// text left to right and, at each position, takes the longest content that starts there
// (leftmost-longest, Hugging Face's rule), calling on_token(id) for it and on_text(piece)
// for the non-empty stretches of text between matches. Contents are matched as raw bytes;
// a content is never split or merged with its neighbours. Empty contents and duplicate
// contents are errors naming the token.
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "kiln/core/error.hpp"

namespace kiln::text {

class added_token_matcher {
 public:
  void add(std::string content, std::int32_t id) {
    KILN_CHECK(!content.empty(), "added token ", id, ": the content is empty");
    for (auto& t : tokens_)
      KILN_CHECK(t.first != content, "added token \"", content, "\" is given twice (ids ", t.second, " and ", id, ")");
    first_[static_cast<unsigned char>(content[0])] = true;
    tokens_.emplace_back(std::move(content), id);
    // Longest first, so the first hit at a position is the longest one.
    std::stable_sort(tokens_.begin(), tokens_.end(),
                     [](const auto& a, const auto& b) { return a.first.size() > b.first.size(); });
  }
  bool empty() const { return tokens_.empty(); }
  const std::vector<std::pair<std::string, std::int32_t>>& tokens() const { return tokens_; }

  template <class OnText, class OnToken>
  void split(std::string_view text, OnText&& on_text, OnToken&& on_token) const {
    std::size_t start = 0, i = 0;
    while (i < text.size()) {
      const std::pair<std::string, std::int32_t>* hit = nullptr;
      if (first_[static_cast<unsigned char>(text[i])])
        for (auto& t : tokens_)
          if (text.compare(i, t.first.size(), t.first) == 0) {
            hit = &t;
            break;
          }
      if (!hit) {
        ++i;
        continue;
      }
      if (i > start) on_text(text.substr(start, i - start));
      on_token(hit->second);
      i += hit->first.size();
      start = i;
    }
    if (start < text.size()) on_text(text.substr(start));
  }

 private:
  std::vector<std::pair<std::string, std::int32_t>> tokens_;
  std::array<bool, 256> first_{};
};

}  // namespace kiln::text
