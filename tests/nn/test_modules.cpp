#include <boost/hana.hpp>
#include <map>

#include "../helpers.hpp"

namespace test_modules {

using namespace kiln;

namespace {
// A user module declared with Hana reflection: children named after the members.
struct classifier {
  BOOST_HANA_DEFINE_STRUCT(classifier, (nn::mlp<nn::relu>, net), (nn::layer_norm<>, norm), (int, not_a_child));
};
// A user module that enumerates its own children.
struct tower {
  nn::embedding<> tok{10, 4};
  nn::sequential<nn::linear<>, nn::gelu, nn::dropout, nn::linear<>> body{nn::linear<>(4, 8), nn::gelu{},
                                                                         nn::dropout(0.5f), nn::linear<>(8, 2, false)};
  bool training = true;
  template <class F>
  void for_each_child(F&& f) {
    f("tok", tok);
    f("body", body);
  }
};
}  // namespace

TEST_CASE("parameter names are hierarchical, stable and match torch.nn.Sequential") {
  manual_seed(1);
  classifier m{nn::mlp<nn::relu>(784, {256, 256}, 10), nn::layer_norm<>(10), 3};
  std::vector<std::string> names;
  std::map<std::string, shape> shapes;
  nn::visit_parameters(m, [&](const std::string& n, auto& p) {
    names.push_back(n);
    shapes[n] = p.shape();
  });
  CHECK(names == std::vector<std::string>{"net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias", "net.4.weight",
                                          "net.4.bias", "norm.weight", "norm.bias"});
  CHECK(shapes["net.0.weight"] == shape{256, 784});
  CHECK(shapes["net.4.bias"] == shape{10});
  const auto c = nn::count_parameters(m);
  CHECK(c.total == 784 * 256 + 256 + 256 * 256 + 256 + 256 * 10 + 10 + 20);
  CHECK(c.trainable == c.total);
  nn::requires_grad(m.norm, false);
  CHECK(nn::count_parameters(m).trainable == c.total - 20);
  auto named = nn::named_parameters<f32>(m);
  CHECK(named[2].param.name() == "net.2.weight");

  tower t;
  names.clear();
  nn::visit_parameters(t, [&](const std::string& n, auto&) { names.push_back(n); });
  CHECK(names == std::vector<std::string>{"tok.weight", "body.0.weight", "body.0.bias", "body.3.weight"});
}

TEST_CASE("train/eval mode reaches nested modules; dropout obeys it") {
  tower t;
  nn::eval(t);
  CHECK_FALSE(t.training);
  CHECK_FALSE(t.body.get<2>().training);
  auto ids = tensor<i64>::from({3}, {1, 2, 3});
  auto y1 = t.body(t.tok(ids)), y2 = t.body(t.tok(ids));
  CHECK(y1.value().to_vector() == y2.value().to_vector());  // deterministic in eval
  nn::train(t);
  CHECK(t.body.get<2>().training);
  auto z1 = t.body(t.tok(ids)), z2 = t.body(t.tok(ids));
  CHECK(z1.value().to_vector() != z2.value().to_vector());  // fresh masks per call
  autograd::tape::current().clear();
}

TEST_CASE("dropout is replayable from its stream and scales kept elements") {
  var<f32> x(tensor<f32>::ones({10000}));
  const philox_stream s{7, 100};
  auto a = dropout(x, 0.25f, s), b = dropout(x, 0.25f, s);
  CHECK(a.value().to_vector() == b.value().to_vector());
  int kept = 0;
  for (float v : a.value().to_vector()) {
    CHECK_UNARY(v == 0.0f || v == doctest::Approx(1.0f / 0.75f));
    kept += v != 0.0f;
  }
  CHECK(kept == doctest::Approx(7500).epsilon(0.03));
  CHECK(dropout(x, 0.25f, s, /*training=*/false).value().to_vector() == x.value().to_vector());
}

TEST_CASE("modules compute what their definitions say") {
  manual_seed(3);
  nn::linear<f64> lin(3, 2);
  const double bound = 1 / std::sqrt(3.0);
  for (double v : lin.weight.value().to_vector()) CHECK(std::abs(v) <= bound);
  var<f64> x(tensor<f64>::from({1, 3}, {1, 2, 3}));
  auto y = lin(x);
  for (int o = 0; o < 2; ++o) {
    double ref = lin.bias->value()(o);
    for (int i = 0; i < 3; ++i) ref += lin.weight.value()(o, i) * x.value()(0, i);
    CHECK(y.value()(0, o) == doctest::Approx(ref));
  }
  manual_seed(3);
  nn::linear<f64> again(3, 2);  // manual_seed makes initialisation reproducible
  CHECK(again.weight.value().to_vector() == lin.weight.value().to_vector());

  nn::layer_norm<f64> ln(4);
  var<f64> h(tensor<f64>::from({1, 4}, {1, 2, 3, 4}));
  auto z = ln(h).value().to_vector();
  double m = 0, v = 0;
  for (double e : z) m += e / 4;
  for (double e : z) v += (e - m) * (e - m) / 4;
  CHECK(std::abs(m) < 1e-12);
  CHECK(v == doctest::Approx(1.0).epsilon(1e-4));
  nn::rms_norm<f64> rn(4);
  auto r = rn(h).value().to_vector();
  CHECK(r[3] == doctest::Approx(4.0 / std::sqrt(30.0 / 4 + 1e-6)));
}

TEST_CASE("module gradients pass check_gradients through the module API") {
  manual_seed(5);
  nn::mlp<nn::gelu_tanh, f64> net(3, {4}, 2);
  auto x = test::rand_var({5, 3}, 9);
  const auto target = tensor<i64>::from({5}, {0, 1, 1, 0, 1});
  std::vector<var<f64>> params;
  for (auto& np : nn::named_parameters<f64>(net)) params.push_back(np.param);
  params.push_back(x);
  const auto r = check_gradients_of([&] { return cross_entropy(net(x), target); }, params);
  INFO(r.report);
  CHECK(r.ok);
  CHECK(r.elements_checked == 3 * 4 + 4 + 4 * 2 + 2 + 15);
  // The module form: parameters are found by the visitor and named in reports.
  nn::layer_norm<f64> ln(3);
  ln.weight->value() = test::rand_tensor<f64>({3}, 17, 0.5, 1.5);
  const auto rm = check_gradients(
      net, [&](auto& m, auto& in) { return cross_entropy(m(ln(in)), target); }, x);
  INFO(rm.report);
  CHECK(rm.ok);
  CHECK(rm.elements_checked == 3 * 4 + 4 + 4 * 2 + 2 + 15);  // the module's parameters and x
}

}  // namespace test_modules
